"""Traffic records in, the same numbers out, everywhere.

``flows`` reads every input format gatewatch accepts (Zeek conn.log as TSV or JSON,
Argus binetflow, NSL-KDD, UNSW-NB15, CICFlowMeter CSVs, pcap and pcapng through the
flow meter) into the canonical flow record, fits and applies the feature encoder,
forms windows of consecutive flows, and knows where each dataset comes from.

Layering: ``flows`` imports numpy and pyarrow (dpkt for packets) and nothing else of
gatewatch. The encoder's transform and the streaming windower need numpy only, because
the edge agent uses them.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("gatewatch.flows")
