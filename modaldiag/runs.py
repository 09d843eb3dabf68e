"""Training runs on disk: what ``modaldiag train`` writes and ``diagnose``/``compare`` read.

A run folder holds ``run.json`` (configuration and test scores), ``history.json`` and
``history.csv`` (one row per epoch), ``model.pt`` (weights only; loads with
``torch.load(weights_only=True)``), figures and the ``.modaldiag`` marker. It is written
atomically once training is complete: a crash leaves no half-written run. While training,
checkpoints go every epoch into ``.OUT.work`` beside the run folder (marker kind ``"train-work"``
with the run's configuration); the same command resumes from there.

The data is an embedded dataset (``datasets.load(name)``) or the user's own, named by a spec
(``--data``: ``pkg.mod:func``, ``path/to/file.py:func`` or an av_folder root); the model is the
default one or the user's (``--model`` spec, a function of the splits). The specs are recorded in
``run.json`` so :meth:`Run.data` and :meth:`Run.model` rebuild both (``diagnose``, ``compare``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from . import datasets
from .datasets import DatasetSplits, MultimodalDataset
from .models import MultimodalModel, default_model
from .models.midfusion import mid_fusion_model
from .probes import evaluate
from .regulators import (
    AGM,
    CML,
    LFM,
    MBSD,
    MLA,
    OGM,
    OPM,
    PMR,
    UME,
    UMT,
    AMCo,
    GBlending,
    Greedy,
    InfoReg,
    MMCosine,
    MMPareto,
    ModalityDropout,
    ReconBoost,
    Relearning,
    ValuationResampling,
)
from .report.compare import regulator_text
from .report.plots import learning_window, save_figure, unimodal_accuracy
from .training import History, fit
from .training.callbacks import prediction_rule
from .utils.io import (
    DirectoryLock,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    discard_folder,
    folder_state,
    read_marker,
    recover,
    safe_torch_load,
    write_marker,
)
from .utils.validation import (
    POSITIVE,
    POSITIVE_INT,
    InstanceOf,
    Options,
    closest_match,
    unpack_batch,
    validate_params,
)

__all__ = ["METHODS", "RUN_KEYS", "make_regulator", "train_run", "load_run", "work_dir", "Run",
           "LoaderSplits", "load_function", "load_data", "build_model", "run_loaders",
           "describe_regulator", "regulator_text", "normalize_spec"]

#: the configuration that identifies a run: re-running with all of them equal resumes
#: (``data`` / ``model``: the user's specs, None for an embedded dataset / the default model)
RUN_KEYS = ("dataset", "data", "model", "method", "epochs", "seed", "fusion", "batch_size", "lr")
#: heads of the default model (``"mid"``: mid fusion, :class:`~modaldiag.models.MidFusionClassifier`)
FUSIONS = ("concat", "sum", "film", "gated", "late", "cosine", "shared", "mid")

METHODS = ("joint", "inforeg", "inforeg-star", "relearning", "ogm", "ogm-ge", "opm", "mmpareto",
           "valuation", "valuation-modality", "agm", "pmr", "mmcosine", "mbsd", "cml", "lfm",
           "gblending", "amco", "mla", "reconboost", "umt", "ume", "dropout", "greedy")
METHOD_LABELS = {"joint": "joint training", "inforeg": "InfoReg", "inforeg-star": "InfoReg*",
                 "relearning": "Re-learning", "ogm": "OGM", "ogm-ge": "OGM-GE", "opm": "OPM",
                 "mmpareto": "MMPareto", "valuation": "valuation re-sampling (sample)",
                 "valuation-modality": "valuation re-sampling (modality)", "agm": "AGM",
                 "pmr": "PMR", "mmcosine": "MMCosine", "mbsd": "MBSD", "cml": "CML", "lfm": "LFM",
                 "gblending": "G-Blending", "amco": "AMCo", "mla": "MLA",
                 "reconboost": "ReconBoost", "umt": "UMT", "ume": "UME",
                 "dropout": "ModalityDropout", "greedy": "Greedy"}


#: methods that need a mid-fusion model (:class:`~modaldiag.models.MidFusionClassifier`)
NEEDS_MID_FUSION = ("greedy",)


def default_fusion(method: str) -> str:
    """The default model's head for a method: ``"shared"`` for MLA (its gradient projection
    needs one linear head shared by every modality), ``"mid"`` for Greedy (mid fusion,
    :class:`~modaldiag.models.MidFusionClassifier`), ``"concat"`` otherwise."""
    return {"mla": "shared", "greedy": "mid"}.get(method, "concat")


def default_run_model(data, fusion: str = "concat", feature_dim: int = 64):
    """The CLI's default model: a :class:`~modaldiag.models.MidFusionClassifier` for
    ``fusion="mid"`` (Greedy's mid fusion), else :func:`~modaldiag.models.default_model`."""
    if fusion == "mid":
        return mid_fusion_model(data)
    return default_model(data, fusion=fusion, feature_dim=feature_dim)


def make_regulator(method: str, epochs: int):
    """The regulator for a CLI method name (paper defaults; schedules scaled to short runs)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}.")
    warmup = min(5, max(1, epochs // 4))
    return {
        "joint": lambda: None,
        "inforeg": lambda: InfoReg(),
        "inforeg-star": lambda: InfoReg(unimodal_loss=True),
        "relearning": lambda: Relearning(every=min(20, max(1, epochs // 3))),
        "ogm": lambda: OGM(alpha=0.8),
        "ogm-ge": lambda: OGM(alpha=0.8, noise=True),
        "opm": lambda: OPM(),
        "mmpareto": lambda: MMPareto(),
        "valuation": lambda: ValuationResampling("sample", warmup=warmup),
        "valuation-modality": lambda: ValuationResampling("modality", warmup=warmup),
        "agm": lambda: AGM(),
        "pmr": lambda: PMR(),
        "mmcosine": lambda: MMCosine(),
        "mbsd": lambda: MBSD(),
        "cml": lambda: CML(),
        "lfm": lambda: LFM(),
        "gblending": lambda: GBlending(super_epoch=min(10, max(1, epochs // 3))),
        "amco": lambda: AMCo(),
        "mla": lambda: MLA(),
        "reconboost": lambda: ReconBoost(max(1, min(4, epochs // 8)), max(1, min(4, epochs // 8))),
        "umt": lambda: UMT(teacher_epochs=max(1, epochs // 2)),
        "ume": lambda: UME(),
        "dropout": lambda: ModalityDropout(p=0.3),
        "greedy": lambda: Greedy(warmup=min(2, epochs // 3)),
    }[method]()


# ---------------------------------------------------------------- the user's data and model
class LoaderSplits(tuple):
    """``(train, val, test)`` loaders returned by a ``--data`` function, with the metadata the
    command line needs (read from the first training batch, and the training labels).

    It is a plain 3-tuple to the user's ``--model`` function (``train, val, test = splits``);
    ``name``, ``modalities``, ``input_shapes`` and ``num_classes`` are computed on first use.
    Loaders yield ``(inputs: dict[str, Tensor (B, ...)], labels: LongTensor (B,))``.
    """

    def __new__(cls, loaders, name: str):
        return super().__new__(cls, tuple(loaders))

    def __init__(self, loaders, name: str):
        self.name = name
        self._first = None
        self._num_classes = None

    @property
    def train(self):
        return self[0]

    @property
    def val(self):
        return self[1]

    @property
    def test(self):
        return self[2]

    def _first_batch(self) -> tuple[Mapping, torch.Tensor]:
        if self._first is None:
            try:
                batch = next(iter(self.train))
            except StopIteration:
                raise ValueError(f"the training loader of {self.name!r} yields no batch.") from None
            self._first = unpack_batch(batch, batch_index=0)
        return self._first

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._first_batch()[0])

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: tuple(x.shape[1:]) for m, x in self._first_batch()[0].items()}

    @property
    def num_classes(self) -> int:
        """``max(training label) + 1`` (one pass over the training loader)."""
        if self._num_classes is None:
            top = max(int(unpack_batch(b)[1].max()) for b in self.train)
            self._num_classes = max(2, top + 1)
        return self._num_classes

    class_names = None


def _spec_error(option: str, spec: str, problem: str) -> ValueError:
    return ValueError(f"{option} {spec!r}: {problem}")


def _import_file(path: Path):
    name = f"_modaldiag_user_{path.stem}_{abs(hash(str(path))):x}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:  # the file's siblings import as in `python file.py`
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_module(name: str, option: str, spec: str, search: Sequence[str]):
    for folder in search:
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if name == missing or name.startswith(missing + "."):
            raise _spec_error(option, spec, (
                f"no module named {missing!r} (searched the current folder {os.getcwd()} and "
                "sys.path). Give an importable module (pkg.mod:func) or a file "
                "(path/to/file.py:func).")) from None
        raise _spec_error(option, spec, f"importing {name!r} failed: {exc} (a module it "
                                        "imports is not installed).") from None


def is_file_spec(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def normalize_spec(spec: str, option: str = "--data") -> str:
    """The spec as recorded in ``run.json``: a file spec with an absolute path, an av_folder root
    as an absolute folder, a module spec as given."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{option}: expected MODULE:FUNCTION or FILE.py:FUNCTION; got {spec!r}.")
    if option == "--data" and os.path.isdir(spec):
        return os.path.abspath(spec)
    module_part, sep, func = spec.rpartition(":")
    if not sep or not module_part or not func:
        root = " or an av_folder root folder" if option == "--data" else ""
        raise _spec_error(option, spec, f"expected MODULE:FUNCTION (e.g. mypkg.data:make_data) "
                                        f"or FILE.py:FUNCTION{root}.")
    if is_file_spec(module_part):
        return f"{os.path.abspath(module_part)}:{func}"
    return spec


def load_function(spec: str, option: str = "--data", *, search: Sequence[str] = ()) -> Callable:
    """The function named by ``spec``: ``"pkg.mod:func"`` (importable; the current folder and
    ``search`` are put on ``sys.path``) or ``"path/to/file.py:func"``. ValueError naming the
    problem (module or file not found, no such function, not callable)."""
    module_part, _, func = normalize_spec(spec, option).rpartition(":")
    if is_file_spec(module_part):
        path = Path(module_part)
        if not path.is_file():
            raise _spec_error(option, spec, f"no such file {str(path)!r}.")
        module = _import_file(path)
        where = str(path)
    else:
        module = _import_module(module_part, option, spec, [os.getcwd(), *search])
        where = module_part
    if not hasattr(module, func):
        names = [n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])]
        close = closest_match(func, names)
        hint = f"; did you mean {close!r}?" if close else (
            f"; its functions: {sorted(names)}" if names else ".")
        raise _spec_error(option, spec, f"{where} has no function {func!r}{hint}")
    fn = getattr(module, func)
    if not callable(fn):
        raise _spec_error(option, spec, f"{where}.{func} is a {type(fn).__name__}, not a function.")
    return fn


def _call_data_function(fn: Callable, spec: str):
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn()
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if required == ["seed"]:
        return fn(seed=0)
    if required:
        raise _spec_error("--data", spec, f"the function must take no arguments (or only "
                                          f"`seed`); it requires {required}.")
    return fn()


def load_data(spec: str, *, search: Sequence[str] = ()):
    """The data named by a ``--data`` spec: :class:`DatasetSplits` or :class:`LoaderSplits`.

    ``spec`` is an av_folder root folder (:func:`modaldiag.datasets.av_folder`) or a function
    spec (:func:`load_function`) taking no arguments (or only ``seed``, given 0) and returning
    ``DatasetSplits``, a ``(train, val, test)`` tuple of loaders, or of ``MultimodalDataset``.
    """
    spec = normalize_spec(spec, "--data")
    if os.path.isdir(spec):
        return datasets.av_folder(spec)
    fn = load_function(spec, "--data", search=search)
    out = _call_data_function(fn, spec)
    name = getattr(fn, "__name__", "data")
    if isinstance(out, DatasetSplits):
        if not out.name:
            out.name = name
        return out
    if isinstance(out, (tuple, list)) and len(out) == 3:
        if all(isinstance(d, MultimodalDataset) for d in out):
            return DatasetSplits(name, *out)
        if all(isinstance(d, Iterable) for d in out):
            return LoaderSplits(out, name)
    shown = (f"a {type(out).__name__} of {len(out)} items" if isinstance(out, (tuple, list))
             else f"a {type(out).__name__}")
    raise _spec_error("--data", spec, (
        f"the function returned {shown}; it must return md.datasets.DatasetSplits or a "
        "(train, val, test) tuple of loaders yielding (dict of input tensors, labels)."))


def build_model(spec: str | None, data, *, fusion: str | None = None, search: Sequence[str] = ()):
    """The model of a run: ``spec``'s function called with ``data`` (the splits), or the default
    model for ``data`` (``fusion``, default "concat"). ValueError when the function returns
    something else than a modaldiag model, or a model whose modalities differ from the data's."""
    if spec is None:
        return default_run_model(data, fusion=fusion or "concat")
    fn = load_function(spec, "--model", search=search)
    model = fn(data)
    if not isinstance(model, MultimodalModel):
        hint = (" It is a plain nn.Module: wrap it, e.g. md.wrap(net, encoders={'audio': "
                "net.audio_net, 'visual': net.visual_net}, head=lambda f: ...)."
                if isinstance(model, torch.nn.Module) else "")
        raise _spec_error("--model", spec, (
            f"the function returned a {type(model).__name__}; it must return a modaldiag model "
            f"(md.MultimodalClassifier(...) or md.wrap(your_model, ...)).{hint}"))
    if set(model.modalities) != set(data.modalities):
        raise _spec_error("--model", spec, (
            f"the model's modalities {list(model.modalities)} do not match the data's "
            f"{list(data.modalities)}; name the model's encoders like the data's inputs."))
    return model


def run_loaders(data, batch_size: int = 64):
    """``(train, val, test, train_eval)`` loaders of a run's data: the shuffled training loader,
    validation and test, and the training data in order (for probes). A :class:`LoaderSplits`
    is used as given (its training loader serves both)."""
    if isinstance(data, LoaderSplits):
        return data.train, data.val, data.test, data.train
    return (data.train.loader(batch_size, shuffle=True), data.val.loader(512),
            data.test.loader(512), data.train.loader(512))


def describe_regulator(regulator) -> dict:
    """A readable, JSON-safe record of a regulator: ``{"label", "class", "config", "text"}``;
    ``text`` shows only the arguments that differ from the class defaults."""
    if regulator is None:
        return {"label": "none (joint training)", "class": None, "config": {},
                "text": "none (joint training)"}
    config = json.loads(json.dumps(regulator.config(), default=repr))
    cls = type(regulator)
    try:  # the defaults as the class resolves them (None -> its actual choice)
        defaults = cls().config()
    except (TypeError, ValueError):
        try:
            defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                        if p.default is not inspect.Parameter.empty}
        except (TypeError, ValueError):
            defaults = {}
    plain = json.loads(json.dumps(defaults, default=repr))
    changed = {k: v for k, v in config.items() if k not in plain or plain[k] != v}
    args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
    return {"label": cls.__name__, "class": f"{cls.__module__}.{cls.__qualname__}",
            "config": config, "text": f"{cls.__name__}({args})"}


class Run:
    """A run read back from disk: its configuration, History, rebuilt model and data."""

    def __init__(self, path: Path, config: dict, history: History, *, status: str = "loaded",
                 resumed_from: int = 0):
        self.path, self.config, self.history = path, config, history
        #: "loaded", "trained", "resumed" or "already complete" (what :func:`train_run` did)
        self.status = status
        #: epochs that were already complete when :func:`train_run` resumed (0: none)
        self.resumed_from = resumed_from

    @property
    def name(self) -> str:
        return self.config.get("name") or self.path.name

    @property
    def _search(self) -> list[str]:
        return [self.config["workdir"]] if self.config.get("workdir") else []

    def data(self):
        """The run's data, rebuilt: the embedded dataset, or the ``--data`` spec's splits."""
        if self.config.get("data"):
            return load_data(self.config["data"], search=self._search)
        return datasets.load(self.config["dataset"], seed=self.config.get("split_seed", 0))

    def model(self, data=None, device="cpu"):
        """The trained model: rebuilt (default model, or the ``--model`` spec's function of
        ``data``) and loaded with the saved weights, on ``device``."""
        data = self.data() if data is None else data
        if self.config.get("model"):
            model = build_model(self.config["model"], data, search=self._search)
        else:
            model = default_run_model(data, fusion=self.config.get("fusion") or "concat",
                                  feature_dim=self.config.get("feature_dim", 64))
        state = safe_torch_load(self.path / "model.pt", map_location=device)
        model.load_state_dict(state["model"])
        return model.to(device)


def load_run(path) -> Run:
    path = Path(path)
    if not (path / "run.json").is_file():
        raise ValueError(f"{str(path)!r} is not a modaldiag run folder (no run.json); create one "
                         "with `modaldiag train`.")
    try:
        config = json.loads((path / "run.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path / 'run.json')!r} is not valid JSON: {exc}") from None
    return Run(path, config, History.load(path / "history.json"))


_TRAIN_CONSTRAINTS = {
    "method": [Options(*METHODS)],
    "epochs": [POSITIVE_INT],
    "seed": [InstanceOf(int, what="an integer")],
    "fusion": [Options(*FUSIONS), None],
    "batch_size": [POSITIVE_INT],
    "lr": [POSITIVE],
    "progress": [bool],
    "overwrite": [bool],
    "restart": [bool],
    "name": [str, None],
    "command": [str, None],
    "data_spec": [str, None],
    "model_spec": [str, None],
}


def work_dir(out: str | os.PathLike) -> Path:
    """Where :func:`train_run` keeps the checkpoints of the unfinished run ``out``: the
    modaldiag-owned folder ``.NAME.work`` beside it (removed once the run is complete)."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.work"


def _differences(old: dict, new: dict) -> str:
    return "; ".join(f"{key} {old.get(key)!r} -> {new[key]!r}" for key in RUN_KEYS
                     if old.get(key) != new[key])


def _finished_config(path: Path) -> dict | None:
    try:
        config = json.loads((path / "run.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def _completed_epochs(work: Path) -> int:
    if not (work / "last.pt").is_file():
        return 0
    try:
        return int(safe_torch_load(work / "last.pt")["epoch"])
    except (ValueError, KeyError, TypeError):
        return 0  # fit() reports the unreadable checkpoint


def _check_finite_weights(model: torch.nn.Module, lr: float) -> None:
    bad = [key for key, value in model.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(f"training diverged: {len(bad)} weight tensor(s) hold NaN or inf (first: "
                         f"{bad[0]}); lower the learning rate (lr={lr:g}).")


def _prepare_work(out: Path, work: Path, config: dict, *, overwrite: bool, restart: bool,
                  command: str | None) -> None:
    if os.path.lexists(work):
        marker = read_marker(work) if not work.is_symlink() else None
        if marker is None or marker.get("kind") != "train-work":
            raise ValueError(f"{work} exists but modaldiag did not create it, so it was not "
                             f"touched; move it away to train into {out}.")
        differs = _differences(marker.get("config") or {}, config)
        if restart or (differs and overwrite):
            discard_folder(work)
        elif differs:
            raise ValueError(f"an interrupted run with a different command is waiting to be resumed "
                             f"in {out} (what differs: {differs}); refusing to mix them. Re-run "
                             "its command to finish it, pass --restart to discard its checkpoints, "
                             "or choose another --out.")
    if not work.exists():  # marked before it gets its name: a crash leaves a stale .partial
        fresh = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".partial",
                                      dir=out.parent))
        write_marker(fresh, "train-work", command=command, config=config)
        os.rename(fresh, work)


def train_run(data, method: str, epochs: int, out, *, seed: int = 0, fusion: str | None = None,
              batch_size: int = 64, lr: float = 0.01, device=None, progress: bool = True,
              name: str | None = None, overwrite: bool = False, restart: bool = False,
              command: str | None = None, log: Callable[[str], None] | None = None,
              data_spec: str | None = None, model_spec: str | None = None) -> Run:
    """Train one run into ``out``, checkpointing every epoch; the same call resumes.

    Parameters
    ----------
    data : DatasetSplits or LoaderSplits
        ``datasets.load(name)``, or :func:`load_data` of ``data_spec``.
    method : str
        One of :data:`METHODS`.
    epochs : int
    out : path
        The run folder, checked before any work
        (:func:`~modaldiag.utils.io.check_output_dir`): a foreign non-empty folder, ``.``, the
        home folder... are refused and never touched.
    seed, batch_size, lr, device, progress, name
        As on the command line; ``name`` labels the run in reports. ``batch_size`` is that of
        the training loader (a :class:`LoaderSplits` is used as given).
    fusion : str, optional
        Fusion of the default model (None: "concat"); not with ``model_spec``.
    overwrite : bool, default False
        Replace a modaldiag folder at ``out`` (a finished run of another configuration, or train
        a finished run of the same configuration again).
    restart : bool, default False
        Discard the checkpoints of an interrupted run and train from epoch 0 (a finished run is
        trained again and replaced).
    command : str, optional
        Recorded in the ``.modaldiag`` markers.
    log : callable(str), optional
        Receives notes such as ``"resuming from epoch k of N"``.
    data_spec, model_spec : str, optional
        The ``--data`` / ``--model`` specs (recorded in ``run.json``; part of the run's
        identity, :data:`RUN_KEYS`). ``data`` must be what ``data_spec`` loads; with
        ``model_spec`` the model is ``build_model(model_spec, data)``.

    Under an exclusive lock held for the whole job (a second process writing ``out`` gets a
    ValueError naming this one's pid):

    * ``out`` missing or empty: trained from scratch, or resumed bit-exactly from the checkpoints
      that an interrupted run of the same configuration (:data:`RUN_KEYS`) left in
      :func:`work_dir`;
    * ``out`` holds a finished run of the same configuration: returned as it is
      (``status == "already complete"``) unless ``overwrite``/``restart``;
    * another configuration (finished, or interrupted checkpoints): ValueError naming what
      differs, unless ``overwrite``/``restart``;
    * training that fails (non-finite loss or weights): ValueError; its checkpoints are removed
      and nothing is written at ``out``.

    Returns
    -------
    Run
        ``run.status`` is ``"trained"``, ``"resumed"`` or ``"already complete"``;
        ``run.resumed_from`` the epochs that were already done.
    """
    validate_params(_TRAIN_CONSTRAINTS, {"method": method, "epochs": epochs, "seed": seed,
                                         "fusion": fusion, "batch_size": batch_size, "lr": lr,
                                         "progress": progress, "overwrite": overwrite,
                                         "restart": restart, "name": name, "command": command,
                                         "data_spec": data_spec, "model_spec": model_spec},
                    "train_run")
    if model_spec is not None and fusion is not None:
        raise ValueError("fusion applies to the default model only; the --model function builds "
                         "its own fusion (drop --fusion).")
    say = log or (lambda text: None)
    data_spec = normalize_spec(data_spec, "--data") if data_spec is not None else None
    model_spec = normalize_spec(model_spec, "--model") if model_spec is not None else None
    config = {"dataset": data.name, "data": data_spec, "model": model_spec, "method": method,
              "epochs": epochs, "seed": seed,
              "fusion": None if model_spec is not None else (fusion or default_fusion(method)),
              "batch_size": batch_size, "lr": float(lr)}
    if method in NEEDS_MID_FUSION and model_spec is None and config["fusion"] != "mid":
        raise ValueError(f"{method} needs mid fusion (cross-modal connections between encoder "
                         "stages to re-balance): use --fusion mid (its default) or a --model "
                         "function returning md.MidFusionClassifier.")
    out = check_output_dir(out, existing_ok=True, option="out")
    work = work_dir(out)
    with DirectoryLock(out):
        recover(out)
        out = check_output_dir(out, existing_ok=True, option="out")
        marker = read_marker(out) if folder_state(out) == "modaldiag" else None
        if marker is not None and not (overwrite or restart):
            done = _finished_config(out) if marker["kind"] == "run" else None
            if done is None:
                raise ValueError(f"{out} already holds a modaldiag {marker['kind']}; pass "
                                 "--overwrite to replace it, or choose another --out.")
            differs = _differences(done, config)
            if differs:
                raise ValueError(f"{out} holds a finished run of a different command (what "
                                 f"differs: {differs}); refusing to mix them. Choose another "
                                 "--out, or pass --overwrite to replace it.")
            if (read_marker(work) or {}).get("config") == config:
                discard_folder(work)
            say(f"{out} is already complete: it holds this finished run ({epochs} epochs); "
                "nothing was retrained (pass --restart to train it again).")
            run = load_run(out)
            run.status = "already complete"
            return run
        _prepare_work(out, work, config, overwrite=overwrite, restart=restart, command=command)
        resumed_from = _completed_epochs(work)
        if resumed_from:
            say(f"resuming from epoch {resumed_from} of {epochs} (checkpoints in {work})")
        regulator = make_regulator(method, epochs)
        try:
            torch.manual_seed(seed)
            model = build_model(model_spec, data, fusion=config["fusion"])
            train_loader, val_loader, test_loader, _ = run_loaders(data, batch_size)
            history = fit(model, train_loader, val_loader, epochs=epochs, regulator=regulator,
                          seed=seed, lr=lr, device=device, progress=progress,
                          checkpoint_dir=work, resume=True)
            _check_finite_weights(model, lr)
        except ValueError as exc:
            discard_folder(work)
            raise ValueError(f"{exc} Nothing was saved to {out} and the run's checkpoints were "
                             "removed.") from None
        rule = prediction_rule(regulator, model)
        test = evaluate(model, test_loader, predict=rule)
        history.meta.update({"dataset": data.name, "method": method, "test": test.to_dict()})
        record = {"name": name or METHOD_LABELS[method], **config, "feature_dim": 64,
                  "split_seed": 0, "regulator": describe_regulator(regulator),
                  "test_acc": test.accuracy, "test_n": test.n,
                  "test_unimodal_acc": {m: s.accuracy for m, s in test.unimodal.items()},
                  "prediction": "head" if rule is None else f"{type(regulator).__name__}.predict",
                  "best_epoch": history.best_epoch}
        if data_spec is not None or model_spec is not None:
            record["workdir"] = os.getcwd()  # where module specs were importable from
        with atomic_directory(out, kind="run", command=command, overwrite=True) as tmp:
            atomic_write_json(tmp / "run.json", record)
            history.save(tmp / "history.json")
            atomic_write_text(tmp / "history.csv", history.to_dataframe().to_csv(index=False))
            torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}},
                       tmp / "model.pt")
            save_figure(unimodal_accuracy(history), tmp / "unimodal_accuracy")
            save_figure(learning_window(history), tmp / "learning_window")
        discard_folder(work)
    run = load_run(out)
    run.status, run.resumed_from = ("resumed" if resumed_from else "trained"), resumed_from
    return run
