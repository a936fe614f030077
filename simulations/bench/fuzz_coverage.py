"""Coverage-guided fuzzing of the sans-IO core: ``python -m simulations.bench.fuzz_coverage
--minutes N``.

Runs every target of ``simulations/fuzz_targets.py`` (the STUN codec, the ``Server`` with a
fixed clock and its invariants checked after each input, and the TCP stream framing once it
exists) under atheris, one after the other, each for its share of the time, with a corpus
seeded from the trace files. Each target runs in a child process (libFuzzer exits its
process) with ``firezone_relay.protocol`` instrumented; a crash is recorded (input saved,
exception shown) and the target resumes for the rest of its time. Prints, per target,
executions, coverage (libFuzzer's ``cov``: edges of the instrumented code; ``ft``: features)
and crashes, and exits 1 when anything crashed.

``--runs N`` bounds each target by executions instead of time (the CI test does that);
``--corpus DIR`` keeps the corpus between runs (default: a fresh temporary one).
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TargetRun", "fuzz", "main"]

ROOT = Path(__file__).resolve().parents[2]
#: the instrumented code: the core (and the targets' own code, so their branches count)
INSTRUMENT = ["firezone_relay.protocol", "simulations.fuzz_targets"]
MODULE = "simulations.bench.fuzz_coverage"
MAX_RESTARTS = 20  # after a crash a target resumes, at most this many times
_COV = re.compile(rb"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)(?: corp: (\d+))?")
_STAT = re.compile(rb"stat::(\w+):\s+(\d+)")


@dataclass
class TargetRun:
    """What one target's fuzzing did."""

    target: str
    seeds: int
    executions: int = 0
    edges: int = 0  # libFuzzer's cov
    features: int = 0  # libFuzzer's ft
    corpus: int = 0
    seconds: float = 0.0
    crashes: list[str] = field(default_factory=list)  # one line each: exception, input file

    def line(self) -> str:
        rate = self.executions / self.seconds if self.seconds else 0.0
        return (
            f"{self.target:>15} {self.seeds:>6} {self.executions:>12} {rate:>9.0f} "
            f"{self.edges:>6} {self.features:>8} {self.corpus:>7} {len(self.crashes):>7}"
        )

    HEADER = (
        f"{'target':>15} {'seeds':>6} {'executions':>12} {'exec/s':>9} {'cov':>6} {'ft':>8} "
        f"{'corpus':>7} {'crashes':>7}"
    )


def _child(target: str, flags: list[str]) -> None:
    """In the child: instrument the core, then fuzz ``target`` (never returns)."""
    import atheris

    with atheris.instrument_imports(include=INSTRUMENT):
        from simulations import fuzz_targets

        # what the targets import lazily must be imported here too, to be instrumented
        for module in fuzz_targets.LAZY_MODULES:
            importlib.import_module(module)
    atheris.Setup([sys.argv[0], *flags], fuzz_targets.TARGETS[target])
    atheris.Fuzz()


def _crash_line(stderr: bytes, artifacts: Path, before: set[Path]) -> str:
    """The exception a crashed child reported, and the input it saved."""
    text = stderr.decode(errors="replace").splitlines()
    marker = next((i for i, line in enumerate(text) if "Uncaught Python exception" in line), None)
    exception = text[marker + 1].strip() if marker is not None and marker + 1 < len(text) else ""
    exception = exception or next((line for line in text if "ERROR" in line), "crash")
    new = sorted(set(artifacts.glob("crash-*")) - before)
    return f"{exception} ({new[-1] if new else 'no input saved'})"


def fuzz_target(
    target: str, corpus: Path, artifacts: Path, seconds: float | None, runs: int | None
) -> TargetRun:
    """Fuzz ``target`` for ``seconds`` (or ``runs`` executions), resuming after crashes."""
    from simulations.fuzz_targets import write_seeds

    run = TargetRun(target, write_seeds(target, corpus))
    start = time.monotonic()
    for _ in range(MAX_RESTARTS + 1):
        flags = ["-seed=1", "-print_final_stats=1", "-max_len=4096", "-rss_limit_mb=2048"]
        flags.append(f"-artifact_prefix={artifacts}/crash-{target}-")
        if runs is not None:
            flags.append(f"-runs={max(0, runs - run.executions)}")
        else:
            assert seconds is not None
            left = seconds - (time.monotonic() - start)
            if left < 1:
                break
            flags.append(f"-max_total_time={int(left)}")
        before = set(artifacts.glob("crash-*"))
        proc = subprocess.run(
            [sys.executable, "-m", MODULE, "--child", target, *flags, str(corpus)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        stats = {m[0].decode(): int(m[1]) for m in _STAT.findall(proc.stderr)}
        run.executions += stats.get("number_of_executed_units", 0)
        covs = _COV.findall(proc.stderr)
        if covs:
            _, edges, features, corp = covs[-1]
            run.edges = max(run.edges, int(edges))
            run.features = max(run.features, int(features))
            run.corpus = int(corp or 0) or run.corpus
        if proc.returncode == 0:
            break
        run.crashes.append(_crash_line(proc.stderr, artifacts, before))
        if not stats:  # died before fuzzing (e.g. atheris missing): do not spin
            run.crashes[-1] += ": " + proc.stderr.decode(errors="replace")[-400:]
            break
        if runs is not None and run.executions >= runs:
            break
    run.seconds = time.monotonic() - start
    run.corpus = run.corpus or sum(1 for _ in corpus.iterdir())
    return run


def fuzz(
    targets: list[str], work: Path, minutes: float | None = None, runs: int | None = None
) -> list[TargetRun]:
    """Fuzz each target in turn: ``minutes`` in all, split evenly, or ``runs`` each."""
    seconds = None if minutes is None else minutes * 60 / len(targets)
    results = []
    for target in targets:
        corpus = work / "corpus" / target
        artifacts = work / "crashes"
        artifacts.mkdir(parents=True, exist_ok=True)
        results.append(fuzz_target(target, corpus, artifacts, seconds, runs))
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[2:])
        return 0
    if argv[:1] == ["--replay"]:
        return _replay(Path(argv[1]))
    from simulations.fuzz_targets import TARGETS

    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    p.add_argument("--minutes", type=float, default=1.0, help="in all, split among the targets")
    p.add_argument("--runs", type=int, help="executions per target instead of a time")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"of {','.join(TARGETS)}")
    p.add_argument("--corpus", type=Path, help="keep the corpus (and crashes) here")
    p.add_argument(
        "--lines",
        action="store_true",
        help="then replay the corpus under coverage.py and print the core's line coverage",
    )
    args = p.parse_args(argv)
    targets = args.targets.split(",")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.error(f"--targets: unknown {','.join(unknown)}")
    work = args.corpus or Path(tempfile.mkdtemp(prefix="fuzz-coverage-"))
    minutes = None if args.runs is not None else args.minutes
    print(f"fuzzing {','.join(targets)}; corpus and crashes in {work}", flush=True)
    print(TargetRun.HEADER, flush=True)
    share = None if minutes is None else minutes / len(targets)
    results = []
    for target in targets:
        (result,) = fuzz([target], work, share, args.runs)
        print(result.line(), flush=True)
        results.append(result)
    for result in results:
        for crash in result.crashes:
            print(f"crash in {result.target}: {crash}")
    if args.lines:
        print(line_coverage(work), flush=True)
    return 1 if any(r.crashes for r in results) else 0


def _replay(corpus: Path) -> int:
    """Run every saved input of every target (``corpus/<target>/*``) once, plainly."""
    from simulations.fuzz_targets import TARGETS

    for target, run in TARGETS.items():
        directory = corpus / target
        for path in sorted(directory.iterdir()) if directory.is_dir() else ():
            run(path.read_bytes())
    return 0


def line_coverage(work: Path) -> str:
    """``coverage report`` of ``firezone_relay.protocol`` over a replay of the corpus (the
    lines the inputs reach; needs coverage.py installed)."""
    data = work / ".coverage"
    python = [sys.executable, "-m", "coverage"]
    source = "--source=firezone_relay.protocol"
    corpus = str(work / "corpus")
    replay = subprocess.run(
        [*python, "run", source, f"--data-file={data}", "-m", MODULE, "--replay", corpus],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if replay.returncode != 0:
        return f"no line coverage (pip install coverage?): {replay.stderr.strip()[-300:]}"
    report = subprocess.run(
        [*python, "report", f"--data-file={data}"], capture_output=True, text=True, check=False
    )
    return report.stdout


if __name__ == "__main__":
    sys.exit(main())
