"""Teacher checkpoints: one folder, safe formats only, everything needed to score.

A checkpoint folder holds ``model.safetensors`` (weights), ``config.json``
(:class:`~teacher.model.TeacherConfig`), ``encoder.json`` (the fitted feature
encoder), ``threshold.json`` (``{"threshold", "rule", "chosen_on"}``),
``history.json`` (per-epoch losses and metrics), ``metrics.json`` (validation and,
where computed, test metrics) and ``provenance.json`` (data, seed, versions, commit),
plus ``checksums.json``: the sha256 of each of those files (and of the replay buffer
when there is one). :func:`load_teacher` checks every recorded sha256 before
building the network or reading weights (only ``config.json`` is parsed first, its
sizes bounded) and names the file that differs. A folder without ``checksums.json``
is refused (exit 3): removing it must not be a way to load changed weights. A
trusted checkpoint written before checksums existed loads with
``allow_unverified=True`` (``--allow-unverified``, or
``GATEWATCH_ALLOW_UNVERIFIED=1``), with a warning. Nothing is pickled: weights are
read with safetensors, the rest is JSON.

:func:`load_teacher` returns a :class:`Teacher`, whose ``predict_proba`` gives the
probability of anomaly per window (higher means more anomalous).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flows.errors import BadInputError, ModelError
from teacher import logger
from teacher.model import TeacherConfig, TeacherNet

__all__ = [
    "CHECKPOINT_FILES",
    "CHECKPOINT_NAMES",
    "CHECKSUMS_FILE",
    "Teacher",
    "checkpoint_problem",
    "checkpoint_strays",
    "load_teacher",
    "make_provenance",
    "save_checkpoint",
    "sha256_file",
    "verify_checksums",
    "write_checksums",
]

CHECKPOINT_FILES = (
    "model.safetensors",
    "config.json",
    "encoder.json",
    "threshold.json",
    "history.json",
    "metrics.json",
    "provenance.json",
)

# The sha256 of each checkpoint file; optional files are hashed when present.
CHECKSUMS_FILE = "checksums.json"
# Set to 1 to load checkpoints without checksums.json (written before checkpoints
# carried sha256s) unverified; ``--allow-unverified`` on the teacher commands.
ALLOW_UNVERIFIED_ENV = "GATEWATCH_ALLOW_UNVERIFIED"


def allow_unverified_default() -> bool:
    """Whether ``$GATEWATCH_ALLOW_UNVERIFIED`` opts in to unverified checkpoints."""
    return os.environ.get(ALLOW_UNVERIFIED_ENV, "").strip().lower() in (
        "1", "true", "yes")
OPTIONAL_FILES = ("replay.safetensors",)
# Every name a checkpoint folder of ours holds, and nothing else.
CHECKPOINT_NAMES = frozenset((*CHECKPOINT_FILES, *OPTIONAL_FILES, CHECKSUMS_FILE))

_RULES = ("best-f1", "fpr", "fixed")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def make_provenance(
    dataset: str | None,
    files: dict[str, str] | None = None,
    seed: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What made a checkpoint: data (name, files + sha256), seed, versions, commit."""
    import sklearn

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }
    try:
        import safetensors

        versions["safetensors"] = safetensors.__version__
    except ImportError:  # pragma: no cover - a train install always has it
        pass
    out = {
        "dataset": dataset,
        "files": dict(files or {}),
        "seed": seed,
        "versions": versions,
        "git_commit": _git_commit(),
        "argv": list(sys.argv),
    }
    out.update(extra)
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DistributedDataParallel and torch.compile wrap the real module.
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _encoder_text(encoder: Any) -> str:
    if isinstance(encoder, str):
        return encoder
    if hasattr(encoder, "to_json"):
        return encoder.to_json()
    raise ModelError("encoder must be an Encoder or its JSON text")


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    model: torch.nn.Module,
    *,
    encoder: Any,
    threshold: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder (created if needed) and return its path.

    ``model`` is a :class:`TeacherNet` (possibly wrapped by DDP); ``encoder`` an
    ``Encoder`` or its JSON; ``threshold`` a dict with ``threshold``, ``rule`` and
    ``chosen_on``.
    """
    from safetensors.torch import save_file

    net = _unwrap(model)
    if not isinstance(net, TeacherNet):
        raise ModelError(f"expected a TeacherNet, got {type(net).__name__}")
    _check_threshold(threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Weights: contiguous CPU copies, since safetensors refuses shared storage.
    state = {k: v.detach().to("cpu").contiguous().clone()
             for k, v in net.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    # Everything else is JSON.
    (out / "config.json").write_text(net.config.to_json() + "\n")
    (out / "encoder.json").write_text(_encoder_text(encoder))
    _write_json(out / "threshold.json", threshold)
    _write_json(out / "history.json", history or [])
    _write_json(out / "metrics.json", metrics or {})
    _write_json(out / "provenance.json", provenance or make_provenance(None))
    write_checksums(out)
    # Often a temporary folder the caller then renames into place, which logs
    # the final path (teacher.cli._write_out).
    logger.debug("wrote teacher checkpoint files to %s (%d params)", out,
                 net.n_params())
    return out


def checkpoint_strays(folder: str | os.PathLike[str]) -> list[str]:
    """The entries of ``folder`` that are not files of a teacher checkpoint, sorted.

    What :func:`save_checkpoint` writes (and the replay buffer and checksums) is
    a checkpoint's, as long as it is a plain file; anything else (another name, a
    subfolder, a symbolic link) is a stray. A folder whose entries are all a
    checkpoint's and include ``model.safetensors`` holds a checkpoint that a new
    one may replace (``teacher train --force``). Raises OSError when the folder
    cannot be listed.
    """
    path = Path(folder)
    return sorted(
        entry.name for entry in path.iterdir()
        if entry.name not in CHECKPOINT_NAMES or entry.is_symlink()
        or not entry.is_file())


def checkpoint_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why ``folder`` is not a checkpoint this package wrote, or None when it is.

    Used before ``--force`` replaces a folder: model.safetensors alone (or with a
    HuggingFace config.json) is someone else's model. A checkpoint of ours has a
    ``checksums.json`` of the shape :func:`verify_checksums` reads, listing every
    checkpoint file, and a ``provenance.json`` object. The sha256s themselves are
    not compared, so a damaged checkpoint of ours can still be replaced.
    """
    path = Path(folder)
    for name in (CHECKSUMS_FILE, "provenance.json"):
        if not (path / name).is_file():
            return f"it has no {name}"
    try:
        sums = _read_json(path / CHECKSUMS_FILE)
        provenance = _read_json(path / "provenance.json")
    except ModelError as exc:
        return str(exc)
    files = sums.get("files") if isinstance(sums, dict) else None
    if not isinstance(files, dict) or sums.get("algorithm") != "sha256":
        return f"its {CHECKSUMS_FILE} is not a checkpoint's list of sha256s"
    unlisted = [n for n in CHECKPOINT_FILES if n not in files]
    if unlisted:
        return f"its {CHECKSUMS_FILE} does not list {', '.join(unlisted)}"
    if not isinstance(provenance, dict):
        return "its provenance.json is not an object"
    return None


def write_checksums(ckpt_dir: str | os.PathLike[str]) -> Path:
    """Record the sha256 of the checkpoint's files in ``checksums.json``.

    Called by :func:`save_checkpoint`, and again by whatever adds an optional file
    (the replay buffer) afterwards.
    """
    out = Path(ckpt_dir)
    names = [n for n in (*CHECKPOINT_FILES, *OPTIONAL_FILES) if (out / n).is_file()]
    _write_json(out / CHECKSUMS_FILE, {
        "algorithm": "sha256", "files": {n: sha256_file(out / n) for n in names}})
    return out / CHECKSUMS_FILE


def verify_checksums(ckpt_dir: str | os.PathLike[str],
                     allow_unverified: bool | None = None) -> bool:
    """Check each file against ``checksums.json``; ModelError naming the first that
    differs or is missing.

    A folder without ``checksums.json`` is refused (BadInputError, exit 3: deleting
    the file must not be a way to load changed weights) unless ``allow_unverified``
    (default: ``$GATEWATCH_ALLOW_UNVERIFIED``); then it is False, with a warning.
    """
    path = Path(ckpt_dir)
    sums_path = path / CHECKSUMS_FILE
    if allow_unverified is None:
        allow_unverified = allow_unverified_default()
    if not sums_path.is_file():
        if not allow_unverified:
            raise BadInputError(
                f"checkpoint has no {CHECKSUMS_FILE}, so its files cannot be "
                "verified and it is not loaded. If it is a trusted checkpoint "
                "written before checkpoints carried sha256s, load it with "
                f"--allow-unverified (or {ALLOW_UNVERIFIED_ENV}=1), or train or "
                "save it again to add them",
                path=str(path))
        logger.warning(
            "%s has no %s (written before checkpoints carried sha256s): its files "
            "are not verified; train or save it again to add them", path,
            CHECKSUMS_FILE)
        return False
    shape = '{"algorithm": "sha256", "files": {name: hex digest}}'
    try:
        data = json.loads(_read_text(sums_path))
    except json.JSONDecodeError as exc:
        # Bad input like a missing checksums.json (exit 3): nothing is verified.
        raise BadInputError(
            f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            f"expected {shape}, as teacher train writes it",
            path=str(sums_path)) from exc
    except RecursionError as exc:  # arrays or objects nested ~1,000 deep
        raise ModelError(
            f"cannot read {sums_path}: nested too deeply to be a checkpoint file"
        ) from exc
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(files, dict) or data.get("algorithm") != "sha256"
            or not all(isinstance(v, str) for v in files.values())):
        raise ModelError(f"{sums_path}: expected {shape}")
    # Every file a checkpoint must have, and any optional one present, is covered:
    # dropping a file from the list must not be a way to change it unnoticed.
    present = [n for n in OPTIONAL_FILES if (path / n).is_file()]
    unlisted = [n for n in (*CHECKPOINT_FILES, *present) if n not in files]
    if unlisted:
        raise ModelError(
            f"{sums_path} does not list {', '.join(unlisted)}; every file of the "
            "checkpoint must be covered (the list was edited, or the folder was "
            "written by something else)")
    for name, want in files.items():
        target = path / name
        if Path(name).name != name:
            raise ModelError(f"{sums_path}: {name!r} is not a file of this folder")
        if not target.is_file():
            raise ModelError(
                f"checkpoint file missing: {target} (listed in {CHECKSUMS_FILE})")
        got = sha256_file(target)
        if got != want.lower():
            raise ModelError(
                f"{target}: sha256 {got} differs from {want} recorded in "
                f"{CHECKSUMS_FILE}; the file was changed or damaged after the "
                "checkpoint was written")
    return True


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default)
                    + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _check_threshold(data: Any) -> None:
    if not isinstance(data, dict) or "threshold" not in data:
        raise ModelError("threshold.json must be an object with a 'threshold' key")
    value = data["threshold"]
    if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ModelError(f"threshold must be a number in [0, 1], got {value!r}")
    if data.get("rule", "fixed") not in _RULES:
        raise ModelError(
            f"threshold rule must be one of {_RULES}, got {data['rule']!r}"
        )


def _first_mismatch(exc: RuntimeError) -> str:
    """torch's load_state_dict error cut to its first problem and a count: it lists
    every tensor, dozens of lines for a changed layer size."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    problems = [ln for ln in lines[1:] if not ln.startswith("Error(s)")]
    if not problems:
        return lines[0] if lines else type(exc).__name__
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0].rstrip(".") + more


def _read_text(path: Path) -> str:
    """The UTF-8 text of one checkpoint file; ModelError if it is missing, is not a
    regular file (a FIFO would hang the load, a folder says nothing useful) or is
    not UTF-8. Opened without blocking and checked on the open file itself."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise ModelError(f"checkpoint file missing: {path}") from exc
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelError(
            f"{path} is not a regular file (a folder, FIFO or device); a "
            "checkpoint holds plain files only"
        )
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path}: not UTF-8 text ({exc})") from exc


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    except RecursionError as exc:  # arrays or objects nested ~1,000 deep
        raise ModelError(
            f"cannot read {path}: nested too deeply to be a checkpoint file"
        ) from exc


def _config_keys(data: Any, path: Path) -> Any:
    """``data`` (config.json parsed) when its keys are a :class:`TeacherConfig`'s:
    every required one there, none unknown; else a ModelError naming the file,
    the keys missing and unknown, and the keys a config has."""
    import dataclasses

    if not isinstance(data, dict):
        return data  # from_dict names what it is
    fields = dataclasses.fields(TeacherConfig)
    required = [f.name for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    known = {f.name for f in fields}
    unknown = sorted(str(k) for k in data if k not in known)
    if not missing and not unknown:
        return data
    problems = []
    if missing:
        problems.append(f"missing key{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)}")
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        problems.append(f"unknown key{'s' if len(unknown) > 1 else ''} "
                        f"{shown}{more}")
    optional = [f.name for f in fields if f.name not in required]
    raise ModelError(
        f"{path}: not a teacher config: {'; '.join(problems)} (expected "
        f"{', '.join(required)} and optionally {', '.join(optional)})")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Teacher:
    """A loaded teacher: network (eval mode), encoder, threshold and metadata."""

    model: TeacherNet
    encoder: Any
    threshold: float
    config: TeacherConfig
    threshold_info: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    batch_size: int = 4096

    @property
    def device(self) -> torch.device:
        """Where the network's weights live."""
        return next(self.model.parameters()).device

    def _check(self, windows: Any) -> np.ndarray:
        arr = np.asarray(windows, dtype=np.float32)
        want = (self.config.window, self.config.n_features)
        if arr.ndim != 3 or tuple(arr.shape[1:]) != want:
            raise BadInputError(
                f"windows must have shape [B, {want[0]}, {want[1]}], "
                f"got {list(arr.shape)}"
            )
        return arr

    @torch.inference_mode()
    def logits(self, windows: Any) -> np.ndarray:
        """Raw logits ``float32 [B]`` for windows ``[B, W, F]``."""
        arr = self._check(windows)
        device = self.device
        out = []
        for start in range(0, len(arr), self.batch_size):
            x = torch.from_numpy(arr[start:start + self.batch_size]).to(device)
            out.append(self.model(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def predict_proba(self, windows: Any) -> np.ndarray:
        """Probability of anomaly ``float32 [B]`` (higher means more anomalous)."""
        z = self.logits(windows).astype(np.float64)
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def predict(self, windows: Any) -> np.ndarray:
        """Decisions ``int8 [B]``: 1 where the probability is at least the threshold."""
        return (self.predict_proba(windows) >= self.threshold).astype(np.int8)


def load_encoder(text: str, source: str = "encoder.json") -> Any:
    """Rebuild the fitted encoder from its JSON (needs ``flows.encoder``).

    ``source`` (the file's path) names the file in errors.
    """
    try:
        from flows.encoder import Encoder
    except ImportError as exc:  # pragma: no cover - flows ships the encoder
        raise ModelError("flows.encoder is needed to rebuild the encoder") from exc
    try:
        return Encoder.from_json(text, source=source)
    except Exception as exc:  # the encoder's own errors, whatever their type
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"{source} cannot be loaded: {exc}") from exc


def _check_encoder_fits(encoder: Any, config: TeacherConfig, encoder_path: Path,
                        config_path: Path) -> None:
    """ModelError unless the encoder makes the windows the network takes: an
    encoder.json of another checkpoint (another window or feature count) would
    otherwise load and fail later on a tensor shape."""
    made = (int(encoder.window), int(encoder.n_features))
    taken = (config.window, config.n_features)
    if made != taken:
        raise ModelError(
            f"checkpoint {encoder_path.parent}: {encoder_path.name} does not fit "
            f"{config_path.name}: the encoder makes windows of {made[0]} x "
            f"{made[1]} features (window x n_features), the network takes "
            f"{taken[0]} x {taken[1]}; the checkpoint is damaged or its files "
            "come from different checkpoints")


def _check_complete(path: Path) -> None:
    """Refuse (BadInputError, exit 3) a folder without ``checksums.json`` that lacks
    any of :data:`CHECKPOINT_FILES`, naming them all. :func:`save_checkpoint`
    writes the checksums last, so such a folder is one whose write stopped part
    way (or no checkpoint at all); --allow-unverified could not load it, so that
    is said before the missing checksums are."""
    if (path / CHECKSUMS_FILE).exists():
        return  # what it lists is checked, file by file, by verify_checksums
    if (path / "manifest.json").is_file():
        raise BadInputError(
            "is a compress artifact (it holds manifest.json), not a teacher "
            "checkpoint; give the teacher checkpoint folder (teacher train --out), "
            "or score the artifact with compress eval --artifact", path=str(path))
    missing = [n for n in CHECKPOINT_FILES
               if not ((path / n).exists() or (path / n).is_symlink())]
    if len(missing) == len(CHECKPOINT_FILES):
        raise BadInputError(
            "not a teacher checkpoint: it holds none of a checkpoint's files "
            f"({', '.join(CHECKPOINT_FILES)})", path=str(path))
    if missing:
        raise BadInputError(
            f"not a complete teacher checkpoint: it has no {', '.join(missing)} "
            f"(nor {CHECKSUMS_FILE}), as a write that stopped part way leaves "
            "it; train or update again to write it whole", path=str(path))


def load_teacher(
    ckpt_dir: str | os.PathLike[str],
    device: str | torch.device | None = None,
    *,
    allow_unverified: bool | None = None,
) -> Teacher:
    """Load a checkpoint folder; the network is in eval mode on ``device``.

    ``device`` defaults to CUDA when present, else CPU. Raises ModelError when a
    file listed in ``checksums.json`` is missing, differs from its recorded sha256
    or does not match the config; BadInputError (exit 3) for a folder without
    ``checksums.json`` that lacks a checkpoint file (one written part way), or
    that has them all, unless ``allow_unverified`` (default
    ``$GATEWATCH_ALLOW_UNVERIFIED``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(ckpt_dir)
    if not path.is_dir():
        raise ModelError(
            f"checkpoint {path} is a file, not a checkpoint folder" if path.exists()
            else f"checkpoint folder not found: {path}")

    # Config first: it says which network the weights belong to. Only parsed (and
    # its sizes bounded) here; nothing is built before the checksums are checked.
    # Then a folder written part way is said to be one, before its checksums are
    # looked for (without config.json, that comes first).
    config_path = path / "config.json"
    if not (config_path.exists() or config_path.is_symlink()):
        _check_complete(path)
    try:
        config = TeacherConfig.from_dict(_config_keys(_read_json(config_path),
                                                      config_path))
    except ModelError as exc:
        if str(config_path) in str(exc):
            raise
        raise ModelError(f"{config_path}: {exc}") from exc
    _check_complete(path)
    verify_checksums(path, allow_unverified)
    net = TeacherNet(config)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"checkpoint file missing: {weights}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ModelError(
            f"{weights} is not a readable safetensors file (damaged or replaced): "
            f"{exc}"
        ) from exc
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"weights in {weights} do not fit config.json: {_first_mismatch(exc)}"
        ) from exc
    damaged = next((key for key, value in state.items()
                    if value.is_floating_point() and not bool(value.isfinite().all())),
                   None)
    if damaged is not None:
        raise ModelError(
            f"checkpoint {path}: its model scores NaN: the weights are damaged "
            f"({weights.name} holds NaN or infinite values in {damaged!r})")
    dev = pick_device(device)
    net.to(dev).eval()

    # Encoder, threshold and metadata.
    encoder_path = path / "encoder.json"
    encoder_text = _read_text(encoder_path)
    encoder = load_encoder(encoder_text, source=str(encoder_path))
    _check_encoder_fits(encoder, config, encoder_path, config_path)
    info = _read_json(path / "threshold.json")
    try:
        _check_threshold(info)
    except ModelError as exc:
        raise ModelError(f"{path / 'threshold.json'}: {exc}") from exc
    teacher = Teacher(
        model=net,
        encoder=encoder,
        threshold=float(info["threshold"]),
        config=config,
        threshold_info=info,
        history=_read_json(path / "history.json"),
        metrics=_read_json(path / "metrics.json"),
        provenance=_read_json(path / "provenance.json"),
        path=path,
    )
    logger.info("loaded teacher from %s on %s (W=%d, F=%d)",
                path, dev, config.window, config.n_features)
    return teacher
