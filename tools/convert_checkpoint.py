"""Convert a checkpoint of any TP x PP x DP x ZeRO layout, on one CPU machine (no process group).

    python tools/convert_checkpoint.py --input RUN/checkpoints/global_stepN --to universal \
        --output DIR
    python tools/convert_checkpoint.py --input RUN/checkpoints/global_stepN --to safetensors \
        --output DIR [--dtype bf16|fp32]
    python tools/convert_checkpoint.py --input TAG_OR_EXPORT --to hf --output DIR \
        [--dtype bf16|fp32] [--max-shard-size 5GB] [--tokenizer MODEL_OR_DIR]

universal: DeepSpeed's universal checkpoint (weights, both Adam moments, step, schedule), every
parameter also under its pipeline-stage name so any layout loads it. A run resuming in another
layout builds this itself; this command is for doing it ahead of time or for other tools.
safetensors: DIR/model.safetensors (full weights, layout-free names) and DIR/config.json (the
model config); start a run from it with checkpoint.init_from=DIR (weights only, step 0).
hf: a Hugging Face model directory (config.json, the model code, sharded safetensors, tokenizer
files giving the run's ids) that AutoModelForCausalLM / AutoModelForMaskedLM.from_pretrained(DIR,
trust_remote_code=True) loads without this project; its input may also be a safetensors or hf
export. checkpoint.init_from=DIR takes it back.
The output is written under a temp name and renamed when complete; the input is only read.
Exit codes: 0 done, 3 the input cannot be converted (the message says why and what to do).
"""
import argparse
import os
import resource
import shutil
import sys
import time

from tqdm import tqdm

from magneto_dist.checkpoint import tags as ckpt
from magneto_dist.checkpoint.export import (DTYPES, check_input, export_safetensors,
                                            refuse_existing)
from magneto_dist.checkpoint.hf_export import DEFAULT_MAX_SHARD_SIZE, export_hf
from magneto_dist.checkpoint.reshard import build_universal
from magneto_dist.data.hf_tokenizer import tokenizer_of_path
from magneto_dist.errors import CheckpointError


def to_universal(tag_dir: str, out_dir: str) -> None:
    if ckpt.Tag.at(tag_dir).layout()["zero_stage"] == 0:
        raise ckpt.CheckpointError(
            f"--input {tag_dir} was written without ZeRO (train.zero_stage=0): DeepSpeed's "
            "universal form is made from ZeRO's partitioned optimizer state, which it lacks; "
            "--to safetensors exports its weights (TP1 x PP1)")
    refuse_existing(out_dir)
    # Built one level down in a scratch folder and moved: DeepSpeed's converter also writes
    # `latest_universal` beside its output, which must not land next to --output.
    scratch = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    try:
        os.rename(build_universal(tag_dir, final=os.path.join(scratch, "universal"),
                                  quiet=False), out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path)
               for name in names if not os.path.islink(os.path.join(root, name)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--input", required=True, help="checkpoint tag: RUN/checkpoints/global_stepN "
                                                  "(for --to hf also an export directory)")
    p.add_argument("--to", required=True, choices=["universal", "safetensors", "hf"])
    p.add_argument("--output", required=True, help="new directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="safetensors / hf weights (default fp32: the master weights as trained)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="hf: largest weight file before sharding, e.g. 500MB, 5GB (default "
                        f"{DEFAULT_MAX_SHARD_SIZE}), as save_pretrained's max_shard_size")
    p.add_argument("--tokenizer", help="hf: the tokenizer to ship, a sentencepiece model or a "
                                       "Hugging Face tokenizer directory (default: the run's)")
    args = p.parse_args(argv)
    start = time.monotonic()
    progress = lambda it, total: tqdm(it, total=total, desc="parameters",  # noqa: E731
                                      unit="param", file=sys.stderr)
    try:
        check_input(args.input, exports_too=args.to == "hf")
        if args.to == "universal":
            to_universal(args.input, args.output)
        elif args.to == "safetensors":
            export_safetensors(args.input, args.output, args.dtype, progress=progress)
        else:
            export_hf(args.input, args.output, args.dtype, args.max_shard_size,
                      tokenizer_of_path(args.tokenizer) if args.tokenizer else None,
                      log=lambda m: print(m, file=sys.stderr), progress=progress)
    except CheckpointError as err:  # ReshardError is one
        print(f"{err.label}: {err}", file=sys.stderr)
        return err.exit_code
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {args.output} ({disk_bytes(args.output) / 2 ** 20:.1f} MiB) from {args.input} "
          f"in {time.monotonic() - start:.1f} s; peak RSS {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
