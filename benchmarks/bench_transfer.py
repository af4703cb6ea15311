"""Benchmark: how fast transfer (--init-from) and incremental updates reach scratch F1.

For each ordered pair of labeled captures of one feature family (source -> target):

1. pretrain a teacher on the source capture (its own encoder);
2. train from scratch on the target (its own encoder): its best validation F1 is
   the goal, and the epoch and wall time at which it first got there are the
   scratch cost;
3. transfer: fine-tune the pretrained weights on the target (source encoder), and
   note the epoch and time at which validation F1 first reaches the goal;
4. incremental: ``teacher.update.update`` on the target with the source's replay
   buffer, measured the same way; F1 on the source's test rows before and after
   shows forgetting (also reported for transfer).

Validation F1 is each epoch's best-F1 on the target's validation rows; the test rows
are only reported. Writes JSON (default ``benchmarks/results/transfer.json``).

    python -m benchmarks.bench_transfer --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows.errors import GatewatchError
from teacher.checkpoint import Teacher
from teacher.data import Prepared, prepare
from teacher.metrics import binary_metrics
from teacher.model import TeacherConfig
from teacher.train import TrainConfig, fit
from teacher.update import make_replay, update

CAPTURES = {
    "ctu50-normal-40": "zeek-conn/ctu50-normal-40-day1.conn.log.labeled",
    "ctu230-njrat": (
        "zeek-conn/ctu-malware-botnet-230-1-njrat-first1000.conn.log.labeled"
    ),
}


def _test_f1(model: torch.nn.Module, prep: Prepared, threshold: float) -> float:
    rows = prep.rows("test")
    with torch.no_grad():
        z = model.eval()(torch.from_numpy(prep.windows(rows))).double().numpy()
    return binary_metrics(prep.y[rows], 1 / (1 + np.exp(-z)), threshold)["f1"]


def _reach(history: list[dict[str, Any]], goal: float) -> dict[str, Any] | None:
    for rec in history:
        if rec["val_f1"] >= goal - 1e-9:
            return {"epoch": rec["epoch"], "elapsed_s": round(rec["elapsed_s"], 2)}
    return None


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_pair(source: Path, target: Path, tc: TrainConfig) -> dict[str, Any]:
    """Scratch, transfer and incremental on one (source, target) pair."""
    src = prepare(source, seed=tc.seed, need_split=True)
    mc = TeacherConfig(n_features=src.n_features, window=src.window)
    pre = fit(src, mc, tc)
    pre_teacher = Teacher(model=pre.model, encoder=src.encoder,
                          threshold=pre.threshold["threshold"], config=mc)

    # From scratch on the target, with the target's own encoder.
    own = prepare(target, seed=tc.seed, need_split=True)
    scratch = fit(own, TeacherConfig(n_features=own.n_features, window=own.window), tc)
    goal = scratch.val_metrics["f1"]

    # Transfer: the source's encoder and weights, fine-tuned on the target.
    tgt = prepare(target, encoder=src.encoder, seed=tc.seed, need_split=True)
    transfer = fit(tgt, mc, tc, init_state=_state(pre.model), target_f1=goal)

    # Incremental: update with the source's replay buffer (target val only).
    replay = make_replay(src, seed=tc.seed)
    inc, report = update(pre_teacher, tgt, None, replay, tc, target_f1=goal)

    def summary(res: Any) -> dict[str, Any]:
        return {"epochs_run": res.epochs_run, "best_epoch": res.best_epoch,
                "wall_s": round(res.wall_s, 2), "val_f1": res.val_metrics["f1"],
                "reached_goal": _reach(res.history, goal)}

    src_thr = pre.threshold["threshold"]
    return {
        "source": source.name, "target": target.name,
        "target_rows": {s: int(tgt.rows(s).size) for s in ("train", "val", "test")},
        "goal_val_f1": goal,
        "pretrain": summary(pre),
        "scratch": summary(scratch),
        "transfer": {**summary(transfer),
                     "source_test_f1_before": _test_f1(pre.model, src, src_thr),
                     "source_test_f1_after": _test_f1(
                         transfer.model, src, transfer.threshold["threshold"])},
        "incremental": {**summary(inc), "replay_size": report["replay_size"],
                        "source_test_f1_before": _test_f1(pre.model, src, src_thr),
                        "source_test_f1_after": _test_f1(
                            inc.model, src, inc.threshold["threshold"]),
                        "target_test_f1_before": report["before"]["new_test_f1"],
                        "target_test_f1_after": report["after"]["new_test_f1"]},
    }


def main(argv: list[str] | None = None) -> int:
    """Run every ordered pair of captures and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/transfer.json")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    try:
        from flows.datasets import data_dir

        root = data_dir(args.data_dir)
        paths = {name: root / rel for name, rel in CAPTURES.items()}
        tc = TrainConfig(epochs=args.epochs, patience=args.patience, seed=args.seed,
                         batch_size=64)
        start = time.monotonic()
        pairs = []
        names = list(paths)
        for a in names:
            for b in names:
                if a != b:
                    print(f"{a} -> {b}", file=sys.stderr, flush=True)
                    pairs.append(run_pair(paths[a], paths[b], tc))
    except GatewatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    out = {"pairs": pairs, "train_config": {"epochs": args.epochs,
                                            "patience": args.patience,
                                            "seed": args.seed, "batch_size": 64,
                                            "threads": args.threads},
           "wall_s": round(time.monotonic() - start, 1),
           "command": "python -m benchmarks.bench_transfer " + " ".join(argv or
                                                                        sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
