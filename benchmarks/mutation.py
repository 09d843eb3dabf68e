"""A small mutation tester for modaldiag's regulators and probes (issue 12, item 6).

Each mutant is one small, plausible bug put into one function of ``modaldiag/regulators/*.py`` or
``modaldiag/probes/*.py``; the test files that cover that source file then run with ``-x`` and a
timeout. A mutant is *killed* when they fail, *survived* when they pass, *timeout* when they run
past the limit (counted separately, not as killed).

Operators (on the AST, so every mutant parses):

- ``cmp``: flip a comparison (``<``/``<=``/``>``/``>=`` to its neighbour or its opposite,
  ``==`` to ``!=``, ``is`` to ``is not``, ``in`` to ``not in``);
- ``arith``: swap ``+``/``-`` and ``*``/``/``;
- ``int``: off-by-one on an integer constant below 100 (also indices and ``range`` bounds;
  larger ones are sizes, seeds and hash multipliers);
- ``const``: replace a constant 0.5 / 1 / 2 / 1.0 / 2.0 by another of them;
- ``not``: drop a ``not``;
- ``minmax``: swap ``min``/``max`` (also ``torch.min/max``, ``argmin/argmax``, ``amin/amax``);
- ``and_or``: swap ``and``/``or``;
- ``neg_return``: negate a returned arithmetic expression.

Never mutated: docstrings and other strings, annotations, ``__all__``, the arguments of
``raise``/``warnings.warn`` (messages), ``_parameter_constraints`` tables and module-level
constants named in upper case that only label things (kept simple: every ``Assign`` whose target
is all upper case is skipped).

The working tree is never touched: the repository is copied to a scratch folder (``--work``), the
mutated file is written there, and pytest runs there with ``PYTHONPATH`` set to the copy (the
script checks that ``modaldiag`` is imported from the copy).

Usage::

    python benchmarks/mutation.py --list                      # count the sites per file
    python benchmarks/mutation.py --sample 80 --seed 0 --out benchmarks/results/mutation.json
    python benchmarks/mutation.py --only probes/shapley.py:12  # one mutant, by file and site id

Sampling is deterministic: sites are enumerated in source order per file, and ``--sample N``
draws N of them with ``random.Random(seed)``, spread over the files in proportion to their site
counts (at least one per file).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("modaldiag/regulators", "modaldiag/probes")
MARKER = ".mutation-work"

#: source file (relative to modaldiag/) -> the test files that cover it, most specific first
TESTS = {
    "regulators/base.py": ["tests/test_regulators.py"],
    "regulators/inforeg.py": ["tests/test_regulators.py", "tests/test_released*.py"],
    "regulators/relearning.py": ["tests/test_regulators.py", "tests/test_released*.py"],
    "regulators/ogm.py": ["tests/test_regulators.py", "tests/test_released*.py"],
    "regulators/opm.py": ["tests/test_regulators.py", "tests/test_released*.py"],
    "regulators/mmpareto.py": ["tests/test_regulators.py", "tests/test_released*.py"],
    "regulators/valuation.py": ["tests/test_regulators.py", "tests/test_released*.py"],
    "probes/shapley.py": ["tests/test_shapley.py", "tests/test_mutation_survivors.py"],
    "probes/fisher.py": ["tests/test_fisher.py", "tests/test_mutation_survivors.py"],
    "probes/_persample.py": ["tests/test_fisher.py", "tests/test_mutation_survivors.py"],
    "probes/window.py": ["tests/test_window.py", "tests/test_released*.py",
                         "tests/test_mutation_survivors.py"],
    "probes/separability.py": ["tests/test_separability.py", "tests/test_mutation_survivors.py"],
    "probes/unimodal.py": ["tests/test_unimodal.py", "tests/test_regulators.py",
                           "tests/test_mutation_survivors.py"],
    "probes/diagnose.py": ["tests/test_diagnose.py", "tests/test_verdict.py"],
    "probes/verdict.py": ["tests/test_verdict.py", "tests/test_diagnose.py"],
    "probes/recommend.py": ["tests/test_verdict.py"],
    "regulators/agm.py": ["tests/test_agm_cml.py"],
    "regulators/cml.py": ["tests/test_agm_cml.py"],
    "regulators/pmr.py": ["tests/test_pmr_amco.py"],
    "regulators/amco.py": ["tests/test_pmr_amco.py"],
    "regulators/mmcosine.py": ["tests/test_mmcosine_mbsd_lfm.py"],
    "regulators/mbsd.py": ["tests/test_mmcosine_mbsd_lfm.py"],
    "regulators/lfm.py": ["tests/test_mmcosine_mbsd_lfm.py"],
    "regulators/gblending.py": ["tests/test_gblending.py"],
    "probes/_common.py": ["tests/test_probe_state.py", "tests/test_shapley.py",
                          "tests/test_mutation_survivors.py"],
}

CMP_SWAP = {ast.Lt: [ast.LtE, ast.Gt], ast.LtE: [ast.Lt, ast.GtE], ast.Gt: [ast.GtE, ast.Lt],
            ast.GtE: [ast.Gt, ast.LtE], ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq],
            ast.Is: [ast.IsNot], ast.IsNot: [ast.Is], ast.In: [ast.NotIn], ast.NotIn: [ast.In]}
ARITH_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
CONST_SWAP = {0.5: 1.0, 1.0: 2.0, 2.0: 1.0}
MINMAX = {"min": "max", "max": "min", "argmin": "argmax", "argmax": "argmin", "amin": "amax",
          "amax": "amin"}


#: hand-written plausible bugs (the kinds issue 12 found unguarded): name -> (file, old, new, tests)
#: Each replaces the first occurrence of ``old`` in the file; "n/a" when the code has moved on.
DDP_TEST = "tests/test_distributed.py::test_every_regulator_derives_identical_coefficients_on_every_rank"
CATALOGUE = {
    "shapley: correctness against label+1": (
        "probes/shapley.py", "correct = (logits.argmax(-1) == labels.view(1, -1)).double()",
        "correct = (logits.argmax(-1) == (labels.view(1, -1) + 1) % logits.shape[-1]).double()",
        ["tests/test_shapley.py"]),
    "shapley: prob/logit/-CE of class label+1": (
        "probes/shapley.py", "y = labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)",
        "y = ((labels + 1) % logits.shape[-1]).view(1, -1, 1).expand(logits.shape[0], -1, 1)",
        ["tests/test_shapley.py"]),
    "shapley: paper value without |S|": (
        "probes/shapley.py", "return correct * sizes.view(-1, 1).double() if value == 'paper' else correct",
        "return correct", ["tests/test_shapley.py"]),
    "OPM: inverted keep mask": (
        "regulators/opm.py", "keep = (torch.rand(f.shape[0], generator=gen) >= q[m])",
        "keep = (torch.rand(f.shape[0], generator=gen) < q[m])",
        ["tests/test_regulators.py", "tests/test_released*.py"]),
    "OPM released: inverted keep mask": (
        "regulators/opm.py", "keep = torch.rand(batch, len(mods), generator=gen) >= q_vec",
        "keep = torch.rand(batch, len(mods), generator=gen) < q_vec",
        ["tests/test_regulators.py", "tests/test_released*.py"]),
    "OPM: baseline added instead of subtracted (non-zero baseline)": (
        "regulators/opm.py", "base + (f - base) * keep.view(shape).to(f.dtype) / (1 - q[m])",
        "base + (f + base) * keep.view(shape).to(f.dtype) / (1 - q[m])",
        ["tests/test_regulators.py", "tests/test_released*.py"]),
    "OPM: scores not all-reduced (DDP)": (
        "regulators/opm.py", "s = all_reduce_sum(s)", "s = s", [DDP_TEST]),
    "OGM: scores not all-reduced (DDP)": (
        "regulators/ogm.py", "sums = all_reduce_sum(self._score_sums.clone())",
        "sums = self._score_sums.clone()", [DDP_TEST]),
    "InfoReg*: unimodal losses at half weight": (
        "regulators/inforeg.py", "ctx.losses[f'unimodal/{m}'] = F.cross_entropy(lg, ctx.labels)",
        "ctx.losses[f'unimodal/{m}'] = 0.5 * F.cross_entropy(lg, ctx.labels)",
        ["tests/test_regulators.py", "tests/test_released*.py"]),
    "Relearning: reset_bn ignored": (
        "regulators/relearning.py", "if self.reset_bn:", "if False:",
        ["tests/test_regulators.py", "tests/test_released*.py"]),
    "Relearning: reset_optimizer ignored": (
        "regulators/relearning.py", "optimizer.state.pop(p, None)", "optimizer.state.get(p, None)",
        ["tests/test_regulators.py", "tests/test_released*.py"]),
    "Relearning: BN counter interpolated like a float": (
        "regulators/relearning.py", "if buf.is_floating_point():", "if True:",
        ["tests/test_regulators.py", "tests/test_released*.py"]),
    "OGM: conv_only ignored": (
        "regulators/ogm.py", "return _conv_weights(model.encoders[m]) if self.conv_only else self.groups(model)[m]",
        "return self.groups(model)[m]", ["tests/test_regulators.py", "tests/test_released*.py"]),
    "OGM-GE: noise std of the modulated gradient": (
        "regulators/ogm.py", "stds = [g.std() + 1e-08 if g.numel() > 1",
        "stds = [k[m] * g.std() + 1e-08 if g.numel() > 1",
        ["tests/test_regulators.py", "tests/test_released*.py"]),
}


@dataclass
class Site:
    file: str      # relative to modaldiag/
    index: int     # position of the node in ast.walk order
    op: str        # operator name
    choice: int    # which replacement (for operators with several)
    line: int
    desc: str


@dataclass
class Outcome:
    site: str
    op: str
    line: int
    desc: str
    status: str    # killed | survived | timeout | error
    seconds: float
    failed: str = ""


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of every node that must not be mutated (strings, annotations, messages, tables)."""
    skip: set[int] = set()

    def drop(node):
        for sub in ast.walk(node):
            skip.add(id(sub))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                drop(body[0])  # docstring
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs,
                      node.args.vararg, node.args.kwarg]:
                if a is not None and a.annotation is not None:
                    drop(a.annotation)
            if node.returns is not None:
                drop(node.returns)
        if isinstance(node, ast.AnnAssign):
            drop(node.annotation)
        if isinstance(node, (ast.Raise, ast.JoinedStr, ast.Assert)):
            drop(node)
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("warn", "validate_params", "_validate", "Interval", "Options", "Satisfies"):
                drop(node)
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            names += [t.attr for t in targets if isinstance(t, ast.Attribute)]
            if any(n == "__all__" or n == "_parameter_constraints" or n.isupper() for n in names):
                drop(node)
        if isinstance(node, ast.keyword) and node.arg in ("stacklevel", "desc", "unit", "leave"):
            drop(node)
    return skip


def _candidates(node: ast.AST) -> list[tuple[str, str]]:
    """(operator, description) of every mutation of this node (one entry per choice)."""
    out = []
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        for new in CMP_SWAP.get(type(node.ops[0]), []):
            out.append(("cmp", f"{type(node.ops[0]).__name__} -> {new.__name__}"))
    elif isinstance(node, ast.BinOp) and type(node.op) in ARITH_SWAP:
        out.append(("arith", f"{type(node.op).__name__} -> {ARITH_SWAP[type(node.op)].__name__}"))
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        v = node.value
        if isinstance(v, float) and v in CONST_SWAP:
            out.append(("const", f"{v} -> {CONST_SWAP[v]}"))
        elif isinstance(v, int) and not isinstance(v, bool):
            if v in (1, 2):
                out.append(("const", f"{v} -> {3 - v}"))
            elif abs(v) < 100:  # sizes, seeds and hash multipliers are left alone
                out.append(("int", f"{v} -> {v + 1}"))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        out.append(("not", "drop not"))
    elif isinstance(node, ast.BoolOp):
        out.append(("and_or", f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}"))
    elif isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
        if name in MINMAX:
            out.append(("minmax", f"{name} -> {MINMAX[name]}"))
    elif isinstance(node, ast.Return) and isinstance(node.value, ast.BinOp):
        out.append(("neg_return", "return -(...)"))
    return out


def _apply(node: ast.AST, op: str, choice: int) -> None:
    if op == "cmp":
        node.ops = [CMP_SWAP[type(node.ops[0])][choice]()]
    elif op == "arith":
        node.op = ARITH_SWAP[type(node.op)]()
    elif op == "const":
        v = node.value
        node.value = CONST_SWAP[v] if isinstance(v, float) else 3 - v
    elif op == "int":
        node.value = node.value + 1
    elif op == "and_or":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif op == "minmax":
        f = node.func
        if isinstance(f, ast.Attribute):
            f.attr = MINMAX[f.attr]
        else:
            f.id = MINMAX[f.id]
    else:
        raise AssertionError(op)


class _DropNot(ast.NodeTransformer):
    def __init__(self, target):
        self.target = target

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        return node.operand if node is self.target else node


class _NegReturn(ast.NodeTransformer):
    def __init__(self, target):
        self.target = target

    def visit_Return(self, node):
        if node is self.target:
            node.value = ast.UnaryOp(op=ast.USub(), operand=node.value)
        return node


def sites_of(rel: str, base: Path = ROOT) -> list[Site]:
    tree = ast.parse((base / "modaldiag" / rel).read_text())
    skip = _skipped_nodes(tree)
    out = []
    for i, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        for choice, (op, desc) in enumerate(_candidates(node)):
            out.append(Site(rel, i, op, choice if op == "cmp" else 0, getattr(node, "lineno", 0), desc))
    return out


def mutate(rel: str, site: Site, source: str) -> str:
    tree = ast.parse(source)
    node = next(n for i, n in enumerate(ast.walk(tree)) if i == site.index)
    if site.op == "not":
        tree = _DropNot(node).visit(tree)
    elif site.op == "neg_return":
        tree = _NegReturn(node).visit(tree)
    else:
        _apply(node, site.op, site.choice)
    return ast.unparse(ast.fix_missing_locations(tree))


def mutant_diff(base: Path, site: Site) -> tuple[str, ...]:
    """The changed lines of a mutant (unparsed form): identifies it across edits of the file."""
    import difflib
    src = (base / "modaldiag" / site.file).read_text()
    before = ast.unparse(ast.parse(src)).splitlines()
    after = mutate(site.file, site, src).splitlines()
    return tuple(ln.strip() for ln in difflib.unified_diff(before, after, lineterm="", n=0)
                 if ln[:1] in "+-" and ln[:3] not in ("+++", "---"))


def all_sites(base: Path = ROOT) -> list[Site]:
    files = sorted(str(p.relative_to(base / "modaldiag")) for d in SOURCES
                   for p in (base / d).glob("*.py") if p.name != "__init__.py")
    return [s for f in files if f in TESTS for s in sites_of(f, base)]


def sample(sites: list[Site], n: int, seed: int) -> list[Site]:
    """n sites, spread over files in proportion to their counts (at least one each)."""
    rng = random.Random(seed)
    by_file: dict[str, list[Site]] = {}
    for s in sites:
        by_file.setdefault(s.file, []).append(s)
    total = len(sites)
    quota = {f: max(1, round(n * len(v) / total)) for f, v in by_file.items()}
    picked = []
    for f in sorted(by_file):
        picked += sorted(rng.sample(by_file[f], min(quota[f], len(by_file[f]))), key=lambda s: (s.line, s.index))
    return picked


def make_work(work: Path) -> None:
    """A scratch copy of the repository. An existing folder is replaced only if this tool made it
    (it holds the marker file): never delete someone else's scratch folder."""
    if work.exists():
        if not (work / MARKER).exists():
            raise SystemExit(f"{work} exists and was not made by this tool; choose another --work")
        shutil.rmtree(work)
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache",
                                    "results", "figures")
    shutil.copytree(ROOT, work, ignore=ignore)
    (work / MARKER).write_text("made by benchmarks/mutation.py\n")


def run_tests(work: Path, tests: list[str], timeout: float, deselect=(), stop_first=True,
              ) -> tuple[str, float, str]:
    env = {**os.environ, "PYTHONPATH": str(work), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    present = []
    for t in tests:  # globs (tests/test_released*.py) expand; node ids keep their ::name
        path, sep, name = t.partition("::")
        matches = sorted(str(p.relative_to(work)) for p in work.glob(path))
        present += [m + sep + name for m in matches]
    if not present:  # never let pytest fall back to collecting the whole suite
        return "error", 0.0, f"none of {tests} exists"
    cmd = [sys.executable, "-m", "pytest", *(["-x"] if stop_first else []), "-q", "-rf",
           "-p", "no:cacheprovider", *present]
    for node in deselect:
        cmd += ["--deselect", node]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    dt = time.perf_counter() - t0
    if proc.returncode == 0:
        return "survived", dt, ""
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if not stop_first:
        return ("killed" if failed else "error"), dt, "\n".join(failed)
    if proc.returncode in (1,) or failed:
        return "killed", dt, (failed[0] if failed else proc.stdout[-300:])[:300]
    return "error", dt, (proc.stdout + proc.stderr)[-300:]


def check_copy(work: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(work)}
    where = subprocess.run([sys.executable, "-c", "import modaldiag; print(modaldiag.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(work)):
        raise SystemExit(f"modaldiag imports from {where}, not from the scratch copy {work}")


def run_catalogue(work: Path, args) -> int:
    """Each hand-written bug alone; the source is normalised with ast.unparse first, so the
    patterns are written in unparse's spelling (single quotes, 1e-08)."""
    rows = []
    deselect = {}
    chosen = {k: v for k, v in CATALOGUE.items() if args.bugs in k}
    for group in sorted({tuple(t) for _, _, _, t in chosen.values()}):
        _, dt, failed = run_tests(work, list(group), args.timeout * 3, stop_first=False)
        deselect[group] = [ln.split()[1] for ln in failed.splitlines()
                           if ln.startswith(("FAILED", "ERROR")) and len(ln.split()) > 1]
        rows.append({"baseline": " ".join(group), "deselected": deselect[group]})
        print(f"baseline {' '.join(group)}: deselected {deselect[group]}", flush=True)
    for name, (rel, old, new, tests) in chosen.items():
        target = work / "modaldiag" / rel
        original = target.read_text()
        norm = ast.unparse(ast.parse(original))
        if old not in norm:
            rows.append({"bug": name, "status": "n/a", "seconds": 0, "failed": ""})
            print(f"{name}: n/a (pattern not found)", flush=True)
            continue
        target.write_text(norm.replace(old, new, 1))
        try:
            status, dt, failed = run_tests(work, tests, args.timeout, deselect[tuple(tests)])
        finally:
            target.write_text(original)
        rows.append({"bug": name, "status": status, "seconds": round(dt, 1), "failed": failed})
        print(f"{name}: {status} ({dt:.0f}s) {failed[:150]}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="count the sites per file and exit")
    ap.add_argument("--sample", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None, help="FILE:SITE_NO (index into --list order)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant")
    ap.add_argument("--work", default="/tmp/modaldiag-mutation-tool")
    ap.add_argument("--show", nargs="*", default=None, help="FILE:SITE_NO: print the mutant's diff")
    ap.add_argument("--rerun", nargs=2, metavar=("RESULTS", "OLD_WORK"), default=None,
                    help="rerun the survivors of RESULTS (made on the snapshot OLD_WORK) on a "
                         "fresh snapshot, matching each mutant by its changed lines")
    ap.add_argument("--catalogue", action="store_true", help="run the hand-written CATALOGUE")
    ap.add_argument("--bugs", default="", help="with --catalogue: only bugs whose name contains this")
    ap.add_argument("--out", default=None, help="JSON results (appended to as mutants finish)")
    ap.add_argument("--files", nargs="*", default=None,
                    help="sample only sites of these files (relative to modaldiag/, e.g. "
                         "regulators/agm.py)")
    args = ap.parse_args(argv)

    work = Path(args.work)
    if not (args.show and (work / MARKER).exists()):  # --show reads an existing snapshot
        make_work(work)  # a frozen snapshot: sites and mutants both come from it
    check_copy(work)
    sites = all_sites(work)
    if args.files:
        unknown = sorted(set(args.files) - {s.file for s in sites})
        if unknown:
            ap.error(f"no mutation sites in {unknown}; see --list for the files")
        sites = [s for s in sites if s.file in args.files]
    if args.catalogue:
        return run_catalogue(work, args)
    if args.show:
        import difflib
        for spec in args.show:
            f, no = spec.rsplit(":", 1)
            site = [s for s in sites if s.file == f][int(no)]
            src = (work / "modaldiag" / f).read_text()
            before = ast.unparse(ast.parse(src)).splitlines()
            after = mutate(f, site, src).splitlines()
            print(f"== {spec} line {site.line} {site.op} {site.desc}")
            for ln in difflib.unified_diff(before, after, lineterm="", n=0):
                if ln[:1] in "+-" and ln[:3] not in ("+++", "---"):
                    print("  " + ln.strip()[:200])
        return 0
    if args.list:
        by_file: dict[str, int] = {}
        for s in sites:
            by_file[s.file] = by_file.get(s.file, 0) + 1
        for f, c in sorted(by_file.items()):
            print(f"{c:5d}  {f}")
        print(f"{len(sites):5d}  total")
        return 0
    if args.rerun:
        old_work = Path(args.rerun[1])
        old = json.loads(Path(args.rerun[0]).read_text())
        old_sites = all_sites(old_work)
        chosen = []
        for row in old["mutants"]:
            if row["status"] != "survived":
                continue
            f, no = row["site"].rsplit(":", 1)
            key = mutant_diff(old_work, [x for x in old_sites if x.file == f][int(no)])
            match = [x for x in sites if x.file == f and x.op == row["op"] and x.desc == row["desc"]
                     and mutant_diff(work, x) == key]
            print(f"rerun {row['site']}: {'found' if match else 'gone from the current code'}")
            chosen += match[:1]
    elif args.only:
        chosen = []
        for spec in args.only:
            f, no = spec.rsplit(":", 1)
            chosen.append([s for s in sites if s.file == f][int(no)])
    else:
        chosen = sample(sites, args.sample, args.seed)

    results: list[Outcome] = []
    # baseline: the unmutated tests of each group; tests that already fail there (work in
    # progress elsewhere in the tree) are deselected for the mutants and reported
    deselect: dict[tuple[str, ...], list[str]] = {}
    baseline = {}
    for group in sorted({tuple(TESTS[s.file]) for s in chosen}):
        status, dt, failed = run_tests(work, list(group), args.timeout * 3, stop_first=False)
        nodes = [ln.split()[1] for ln in failed.splitlines() if ln.startswith(("FAILED", "ERROR"))
                 and len(ln.split()) > 1]
        deselect[group] = nodes
        baseline[" ".join(group)] = {"status": status, "seconds": round(dt, 1), "deselected": nodes}
        print(f"baseline {' '.join(group)}: {status} {dt:.0f}s deselected {nodes}", flush=True)

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps({"seed": args.seed, "sample": args.sample,
                                                  "sites": len(sites), "baseline": baseline,
                                                  "mutants": [asdict(r) for r in results]},
                                                 indent=1))
    for k, site in enumerate(chosen):
        target = work / "modaldiag" / site.file
        original = target.read_text()
        target.write_text(mutate(site.file, site, original))
        try:
            status, dt, failed = run_tests(work, TESTS[site.file], args.timeout,
                                           deselect[tuple(TESTS[site.file])])
        finally:
            target.write_text(original)
        no = [s for s in sites if s.file == site.file].index(site)
        out = Outcome(f"{site.file}:{no}", site.op, site.line, site.desc, status, round(dt, 1), failed)
        results.append(out)
        print(f"[{k + 1}/{len(chosen)}] {out.site} L{site.line} {site.op} {site.desc}: {status} "
              f"({dt:.0f}s) {failed[:120]}", flush=True)
        save()
    save()
    counts = {s: sum(r.status == s for r in results) for s in ("killed", "survived", "timeout", "error")}
    print(json.dumps({"mutants": len(results), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
