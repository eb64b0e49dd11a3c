"""Merge the winners of tuner logs (`python -m tritonlstm.tune --log`) into the shipped configs of their GPU: a key
takes the log's best config where it beat the config that ran for the key (`current_ms`) by more than --margin.

    python perf/merge_tuned.py perf/results/<run>/tune-log*.json [--margin 0.02]

Prints every key's decision. A GPU that ran its sibling's shipped configs (tuning.SHIPPED_SIBLINGS) gets a file of
its own that starts from the sibling's, so its untuned keys keep what they ran. Configs measured by other means
(a kernel A/B) are merged by hand, and say so in kernels/configs/README.md."""

import argparse
import json
from pathlib import Path

from tritonlstm.configs import LSTMConfig
from tritonlstm.tuning import read_configs, shipped_gpu, shipped_path, write_configs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("--margin", type=float, default=0.02, help="fraction the best must beat the current by")
    args = ap.parse_args(argv)
    by_gpu: dict[tuple[str, str], dict[str, LSTMConfig]] = {}
    for path in args.logs:
        log = json.loads(path.read_text())
        owner = shipped_gpu(log["gpu"])
        shipped = read_configs(shipped_path(owner), owner, None)
        new = by_gpu.setdefault((log["gpu"], log["triton"]), {})
        for e in log["keys"]:
            best = LSTMConfig(**e["best"])
            if best == shipped.get(e["key"]):
                print(f"{e['key']:28} {e['best_ms']:8.3f}    the best already ships")
            elif e["best_ms"] < (1 - args.margin) * e["current_ms"]:
                new[e["key"]] = best
                print(f"{e['key']:28} {e['current_ms']:8.3f} -> {e['best_ms']:8.3f} ms")
            else:
                print(f"{e['key']:28} {e['current_ms']:8.3f}    kept (best {e['best_ms']:.3f})")
    for (gpu, triton_version), configs in by_gpu.items():
        owner = shipped_gpu(gpu)
        if owner != gpu:
            configs = {**read_configs(shipped_path(owner), owner, None), **configs}
            print(f"{gpu}: a file of its own, from {owner}'s shipped configs")
        write_configs(shipped_path(gpu), gpu, configs, triton_version=triton_version)
        print(f"{len(configs)} keys written to {shipped_path(gpu)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
