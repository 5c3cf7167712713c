"""Images/s of each training stage against the batch size, the smallest batch as the baseline.

Short runs of ``cryospin reconstruct`` on one data set, one at a time, for each preset and
``--batch-size``: the ``default`` preset as ``--epochs 3 --switch-epoch 1 --search-epochs 1``
(one stage-1 epoch, one global-search epoch, one local epoch), ``paper-synthetic`` as
``--epochs 2 --switch-epoch 1`` (one stage-1 epoch, the switch's inference pass and
hypotheses, one local epoch). Images/s per stage from each run's ``metrics.jsonl``, the switch's
seconds, and each row's speed-up against the preset's first batch. Speed only: the learning rates
are the preset's at every batch size, so the runs' accuracy is not compared here::

    python benchmarks/bench_batch.py --data DATA --workdir bench_out/batch -- --device cuda
    python benchmarks/bench_batch.py --data DATA --batches default=64,256 --threads 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cryospin_argv, machine_line, markdown_table, read_jsonl, run  # noqa: E402

#: per preset: the flags that make a short run, and what each of its epochs is
SHORT_RUN = {
    "default": (["--epochs", "3", "--switch-epoch", "1", "--search-epochs", "1"],
                ("stage 1", "search", "local")),
    "paper-synthetic": (["--epochs", "2", "--switch-epoch", "1"], ("stage 1", "local")),
}
STAGES = ("stage 1", "search", "local")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with particles.star")
    p.add_argument("--workdir", type=Path, default=Path("bench_out/batch"))
    p.add_argument("--batches", nargs="+",
                   default=["default=64,256,1024", "paper-synthetic=32,128,512"],
                   help="PRESET=B1,B2,... (the first batch is the baseline)")
    p.add_argument("--threads", type=int, default=None, help="reconstruct --threads")
    p.add_argument("reconstruct_args", nargs="*", help="extra flags for reconstruct (after --)")
    return p.parse_args()


def _stage_speeds(run_dir: Path, layout: tuple[str, ...]) -> dict[str, float]:
    """Images/s of each epoch of a short run, named by ``layout``, and the switch's seconds."""
    out: dict[str, float] = {}
    for m in read_jsonl(run_dir / "metrics.jsonl"):
        out[layout[int(m["epoch"]) - 1]] = float(m["images_per_s"])
        switch = (m.get("extra") or {}).get("switch")
        if switch:
            out["switch"] = float(switch["wall_time_s"])
    return out


def main() -> None:
    args = _parse()
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = args.workdir / "bench.log"
    header = ["preset", "batch", "stage 1 (img/s)", "search (img/s)", "local (img/s)",
              "switch (s)", "speed-up vs first batch (stage 1 / search / local)"]
    rows: list[list[str]] = []
    threads = ["--threads", str(args.threads)] if args.threads else []
    for spec in args.batches:
        preset, _, sizes = spec.partition("=")
        if preset not in SHORT_RUN or not sizes:
            sys.exit(f"--batches: {spec!r} is not PRESET=B1,B2,... with PRESET one of "
                     f"{', '.join(SHORT_RUN)}")
        flags, layout = SHORT_RUN[preset]
        base: dict[str, float] = {}
        for batch in (int(b) for b in sizes.split(",")):
            run_dir = args.workdir / f"{preset}_b{batch}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run(cryospin_argv() + [
                "reconstruct", str(args.data / "particles.star"), "-o", str(run_dir),
                "--preset", preset, "--batch-size", str(batch), "--seed", "0", "--no-progress",
                *flags, *threads, *args.reconstruct_args], log)
            speed = _stage_speeds(run_dir, layout)
            base = base or speed
            rows.append([preset, str(batch)]
                        + [f"{speed[k]:.0f}" if k in speed else "—" for k in STAGES]
                        + [f"{speed['switch']:.1f}" if "switch" in speed else "—",
                           " / ".join(_ratio(speed.get(k), base.get(k)) for k in STAGES)])
            print(markdown_table(header, rows[-1:]), file=sys.stderr, flush=True)
    table = markdown_table(header, rows)
    extra = " ".join(threads + args.reconstruct_args)
    text = f"{table}\n\nmachine: {machine_line()}\nreconstruct flags: {extra}\n"
    (args.workdir / "results.md").write_text(text)
    print(text)


def _ratio(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.2f}×"


if __name__ == "__main__":
    main()
