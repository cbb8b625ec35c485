"""Convert a checkpoint of any TP x PP x DP x ZeRO layout, on one CPU machine (no process group).

    python tools/convert_checkpoint.py --input RUN/checkpoints/global_stepN --to universal \
        --output DIR
    python tools/convert_checkpoint.py --input RUN/checkpoints/global_stepN --to safetensors \
        --output DIR [--dtype bf16|fp32]

universal: DeepSpeed's universal checkpoint (weights, both Adam moments, step, schedule), every
parameter also under its pipeline-stage name so any layout loads it. A run resuming in another
layout builds this itself; this command is for doing it ahead of time or for other tools.
safetensors: DIR/model.safetensors (full weights, layout-free names) and DIR/config.json (the
model config); start a run from it with checkpoint.init_from=DIR (weights only, step 0).
The output is written under a temp name and renamed when complete; the input is only read.
Exit codes: 0 done, 3 the input cannot be converted (the message says why and what to do).
"""
import argparse
import os
import resource
import sys
import time

from tqdm import tqdm

from magneto_dist.checkpoint import manager as ckpt
from magneto_dist.checkpoint.export import DTYPES, export_safetensors
from magneto_dist.checkpoint.reshard import ReshardError, build_universal

EXIT_CHECKPOINT_ERROR = 3


def check_input(tag_dir: str) -> None:
    """A complete, undamaged tag directory, or CheckpointError saying what it is instead."""
    tag_dir = tag_dir.rstrip("/")
    ckpt_dir, tag = os.path.split(tag_dir)
    if not os.path.isdir(tag_dir):
        raise ckpt.CheckpointError(f"--input {tag_dir} is not a directory; pass a checkpoint "
                                   "tag, e.g. runs/gpt_tiny/checkpoints/global_step200")
    if not os.path.isfile(os.path.join(tag_dir, "config.yaml")):
        raise ckpt.CheckpointError(f"--input {tag_dir} is not a checkpoint of this project (no "
                                   "config.yaml); pass RUN/checkpoints/global_stepN")
    if not ckpt.is_complete(ckpt_dir, tag):
        raise ckpt.CheckpointError(f"--input {tag_dir} is incomplete (no {ckpt.COMPLETE}: its "
                                   "save was interrupted); convert an older tag")
    problem = ckpt.damage(ckpt_dir, tag)
    if problem:
        raise ckpt.CheckpointError(f"--input {tag_dir} is damaged: {problem}")


def to_universal(tag_dir: str, out_dir: str) -> None:
    ckpt_dir, tag = os.path.split(tag_dir.rstrip("/"))
    if ckpt.saved_layout(ckpt_dir, tag)["zero_stage"] == 0:
        raise ckpt.CheckpointError(
            f"--input {tag_dir} was written without ZeRO (train.zero_stage=0): DeepSpeed's "
            "universal form is made from ZeRO's partitioned optimizer state, which it lacks; "
            "--to safetensors exports its weights (TP1 x PP1)")
    if os.path.exists(out_dir):
        raise ckpt.CheckpointError(f"--output {out_dir} already exists; choose a new directory")
    build_universal(tag_dir, final=out_dir, quiet=False)


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path)
               for name in names if not os.path.islink(os.path.join(root, name)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--input", required=True, help="checkpoint tag: RUN/checkpoints/global_stepN")
    p.add_argument("--to", required=True, choices=["universal", "safetensors"])
    p.add_argument("--output", required=True, help="new directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="safetensors weights (default fp32: the master weights as trained)")
    args = p.parse_args(argv)
    start = time.monotonic()
    try:
        check_input(args.input)
        if args.to == "universal":
            to_universal(args.input, args.output)
        else:
            export_safetensors(args.input, args.output, args.dtype, progress=lambda it, total: tqdm(
                it, total=total, desc="parameters", unit="param", file=sys.stderr))
    except (ckpt.CheckpointError, ReshardError) as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return EXIT_CHECKPOINT_ERROR
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {args.output} ({disk_bytes(args.output) / 2 ** 20:.1f} MiB) from {args.input} "
          f"in {time.monotonic() - start:.1f} s; peak RSS {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
