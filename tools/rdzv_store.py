"""A rendezvous store of its own for launch/ft_launch.py, so that no launcher is a single point
of failure: the c10d rendezvous lives in the first launcher's process unless every launcher
gets `--rdzv-conf is_host=false` and points at this store instead: then losing any node, the
first included, leaves the rendezvous standing and the survivors re-form.

    python tools/rdzv_store.py --port 29400 [--host 0.0.0.0]     # on a login or service node
    python launch/ft_launch.py --nnodes 2:4 --rdzv-endpoint STORE_HOST:29400 \\
        --rdzv-conf is_host=false ... launch/pretrain_gpt.py ...

Runs until killed (SIGTERM or Ctrl-C). For more than one store, use etcd (--rdzv-backend etcd-v2).
"""
import argparse
import signal
import sys
import time

from torch.distributed import TCPStore


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="0.0.0.0")
    args = p.parse_args()
    try:
        store = TCPStore(args.host, args.port, is_master=True, wait_for_workers=False)
    except RuntimeError as err:
        print(f"rdzv_store: cannot serve on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    print(f"rendezvous store serving on {args.host}:{args.port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        del store


if __name__ == "__main__":
    sys.exit(main())
