"""Size limits of a teacher, kept free of torch so the command line can check flags.

A config.json past these is damaged or hostile (it would allocate gigabytes before
any weight is read); a flag past them is a usage error.
"""

# The largest features, window, filters, hidden units or members a config may ask for.
MAX_SIZE = 65_536
# Piecewise-linear bins per expanded column (the quantile maps keep 256 knots, so
# finer bins would split nothing more).
MAX_BINS = 256
# Weights of the whole network, ensemble members included (200 MB of float32; the
# default NSL-KDD teacher has 764,163).
MAX_PARAMS = 50_000_000
# Window length the command line accepts (windows are gathered as [rows, W, F]).
MAX_WINDOW = 1024
