"""How many epochs does ApiQ-bw need from a warm start (wsvd, gptq)? Block losses on the first blocks of the model.

A cheap proxy for the full P1 run: the default model truncated to its first ``--blocks`` decoder blocks is
quantized in memory (W2g64, r8, 32 PTB-train windows of 512 tokens, seed 0, as P1) with each recipe, and the
final block-output MSE of every block is printed. The ``published`` recipe run in the same process gives
the block losses and the time to beat (its full-model losses are also in ``bench/results/p1.json``, row
``apiq-bw-w2``), so a recipe whose losses match it at a third of its time is a candidate for a full P1 row.

    python bench/warm_epochs.py --recipes published,warm4,gptq0,gptq2
    python bench/warm_epochs.py --recipes gptq,gptq2,blockap-gptq --holdout 4   # train vs held-out block error

With ``--holdout N`` the calibration draw has N more windows (its first 32 are the same), which the method never
sees; each block then reports its relative error on the training windows and on the held-out ones.
"""

from __future__ import annotations

import argparse
import json
import time

import benchlib

RECIPES = {
    "published": {},  # ApiQ-bw's published recipe (20 epochs, B = 0): the time and losses to beat, same process
    "warm2": {"warm_start": "wsvd", "epochs": 2},
    "warm3": {"warm_start": "wsvd", "epochs": 3},
    "warm4": {"warm_start": "wsvd", "epochs": 4},
    "warm5": {"warm_start": "wsvd", "epochs": 5},
    "warm2-lr2x": {"warm_start": "wsvd", "epochs": 2, "clip_lr": 1e-2, "lora_lr": 1e-3},
    "warm2-lr4x": {"warm_start": "wsvd", "epochs": 2, "clip_lr": 2e-2, "lora_lr": 2e-3},
    "warm6": {"warm_start": "wsvd", "epochs": 6},
    "cold6": {"epochs": 6},
    "warm8": {"warm_start": "wsvd", "epochs": 8},
    "gptq0": {"warm_start": "gptq", "epochs": 0},
    "gptq2": {"warm_start": "gptq", "epochs": 2},
    "gptq4": {"warm_start": "gptq", "epochs": 4},
    "gptq": {"init": "gptq"},  # GPTQ codes alone, no adapter
    "blockap": {"init": "blockap"},
    "blockap-gptq": {"init": "blockap", "warm_start": "gptq"},
    # Block-AP from GPTQ codes at lower learning rates: at the defaults (weight 1e-4, scales/zeros 5e-4) the full P1
    # row's training loss rose in the second epoch (block 0: 0.167 -> 0.306)
    "blockap-gptq-paper": {"init": "blockap", "warm_start": "gptq", "weight_lr": 2e-5, "qparam_lr": 1e-4},
    "blockap-gptq-slow": {"init": "blockap", "warm_start": "gptq", "weight_lr": 5e-6, "qparam_lr": 2.5e-5},
    "blockap-gptq-weights": {"init": "blockap", "warm_start": "gptq", "weight_lr": 2e-5, "qparam_lr": 0.0},
    "blockap-gptq-grid": {"init": "blockap", "warm_start": "gptq", "weight_lr": 0.0, "qparam_lr": 1e-4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"subset of {', '.join(RECIPES)}")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--epoch-losses", action="store_true", help="also print each block's mean loss per epoch")
    parser.add_argument("--holdout", type=int, default=0, help="held-out calibration windows (block error on them)")
    args = parser.parse_args()

    import lowbit
    from lowbit.api import load_model
    from lowbit.arch import find_blocks
    from lowbit.data import sample_windows, text_windows
    from lowbit.models import quiet_transformers

    quiet_transformers()
    published = json.loads((benchlib.ROOT / "bench" / "results" / "p1.json").read_text())["rows"].get("apiq-bw-w2")
    if published:
        print("published (20 epochs, from p1.json):", [round(b["loss"], 3) for b in published["blocks"][: args.blocks]])
    published_seconds = None  # the same-process time that the ratios are against
    for name in args.recipes.split(","):
        model, tokenizer = load_model(None)
        _, blocks = find_blocks(model)
        del blocks[args.blocks :]
        model.config.num_hidden_layers = args.blocks
        calib = sample_windows(text_windows("ptb", tokenizer, 512, split="train"), 32 + args.holdout, 0)
        options = {**RECIPES[name], "holdout_windows": args.holdout}
        init = options.pop("init", "apiq-bw")
        config = lowbit.QuantConfig(bits=2, group_size=64, init=init, rank=8, alpha=16.0, seed=0,
                                    options=options)  # fmt: skip
        start = time.perf_counter()
        lowbit.quantize(model, config, calib=calib, progress=False)
        losses = [round(b["stats"]["mse"], 3) for b in model.lowbit_stats]
        seconds = time.perf_counter() - start
        if name == "published":
            published_seconds = seconds
        ratio = f" ({seconds / published_seconds:.2f} x published)" if published_seconds else ""
        print(f"{name}: {seconds:.1f} s{ratio}, block losses {losses}", flush=True)
        if args.holdout:
            for key in ("train_rel_error", "rel_error"):
                errors = [round(b["stats"][key], 4) for b in model.lowbit_stats]
                print(f"  relative error on {'training' if key.startswith('train') else 'held-out'} windows: {errors}")
        if args.epoch_losses and init != "gptq":  # gptq trains nothing
            for b in model.lowbit_stats:
                print(f"  block {b['index']}: epochs", [round(v, 3) for v in b["stats"]["epoch_losses"]], flush=True)
    env = benchlib.environment()
    print(f"{env['date']}, commit {env['commit']}, {env['machine']['cpu']} ({env['machine']['cores']} cores)")


if __name__ == "__main__":
    main()
