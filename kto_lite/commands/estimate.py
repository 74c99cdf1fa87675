"""`python -m kto_lite estimate`: predict a config's peak GPU memory, with a breakdown (kto_lite/memory.py)."""

from __future__ import annotations

import json
import sys

from kto_lite.commands import cli
from kto_lite.config import TrainConfig
from kto_lite.errors import MemoryEstimateError, UsageError
from kto_lite.memory import GPUS, estimate_memory, find_gpu, suggest_fit


def main(argv: list[str] | None = None) -> int:
    """`python -m kto_lite estimate [CONFIG.yaml] [--FIELD VALUE ...] [--gpu_memory GiB] [--gpu NAME] [--device cpu]
    [--processes N]`.

    Prints the breakdown; with a budget (--gpu_memory, or a known --gpu) also whether it fits and what
    to change. Exit status: 0 fits (or no budget given), 1 does not fit, 2 bad config or model.
    """
    parser = cli.Parser("estimate", main.__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="a YAML file of config fields, as for train")
    parser.add_flag("gpu_memory", type=float, help="GPU memory budget in GiB, e.g. 12")
    parser.add_flag("gpu", help="GPU name, e.g. 'T4' or 'RTX 4090': fp16 vs bf16, and its memory as budget")
    parser.add_flag("device", choices=("cuda", "cpu"), default="cuda")
    parser.add_flag("processes", type=int, default=1,
                    help="with --fsdp true: the GPUs of the launch (torchrun --nproc_per_node N); memory per GPU")
    parser.add_flag("json", action="store_true", help="print the breakdown as JSON")
    parser.add_config_fields()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        config = TrainConfig.load(args.config, cli.config_overrides(args)).resolved()
        if config.fsdp and args.processes < 2:
            raise UsageError("fsdp: true shards the run across the processes of a launch: give --processes N, "
                                 "the GPUs it runs on (torchrun --nproc_per_node N)")
        if args.processes > 1 and not config.fsdp:
            raise UsageError(f"--processes {args.processes} changes nothing without --fsdp true: each process "
                                 "of a DDP launch holds the whole model (this estimate is per GPU)")
        gpu = find_gpu(args.gpu)
        budget = args.gpu_memory or (gpu.vram_gib if gpu else None)
        if args.gpu and not gpu and not args.gpu_memory:
            print(f"note: unknown GPU {args.gpu!r} (known: {', '.join(GPUS)}); give --gpu_memory GiB", file=sys.stderr)
        try:
            result = estimate_memory(config, gpu_name=args.gpu, device=args.device, processes=args.processes)
        except MemoryEstimateError as e:
            raise UsageError(str(e)) from e
        if args.json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            print(result.format(budget))
        if budget is None or result.fits(budget):
            return 0
        for line in suggest_fit(config, budget, gpu_name=args.gpu, device=args.device, processes=args.processes):
            print(f"  - {line}")
        return 1

    return cli.run(body)

