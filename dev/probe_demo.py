"""How fast a tiny Qwen3-VL learns the demo's blocks task: the probe that chose `pigg demo`'s model and
learning rate (issue 24). Not part of pigg: a plain training loop on pigg's collator and loss, no
Trainer, and teacher-forced held-out accuracy instead of generation (every coordinate digit right means
the right grid cell, a Click@140 hit), so that many settings can run side by side on one GPU.

    python dev/probe_demo.py --hidden 128 --layers 4 --head-dim 32 --theta 100 --lr 3e-4 --train all \
        --blocks 2,3 --colours 4 --steps 700 [--device cuda --threads 1]

Prints the held-out cell accuracy every --eval-every steps, then one RESULT line of JSON. Users 5-16
train, 1-4 are held out; no private words (the global task only).
"""
import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from pigg.data.collate import TrainCollator
from pigg.data.samples import Sample
from pigg.data.processor import make_processor
from pigg.offline import blocks
from pigg.trainer import supervised_loss


def build(args):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from pigg.model.architectures import SPECIAL_IDS
    hd = args.head_dim
    half = hd // 2
    sec = [half - 2 * (half // 4), half // 4, half // 4] if args.mrope == "even" else [half // 2, half // 4, half // 4]
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=args.hidden, intermediate_size=args.inter or 2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // hd,
                         num_key_value_heads=args.hidden // hd, head_dim=hd, max_position_embeddings=8192,
                         rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": args.theta,
                                          "mrope_interleaved": True, "mrope_section": sec}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=args.hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                           deepstack_visual_indexes=[1]),
        tie_word_embeddings=False, **SPECIAL_IDS)
    torch.manual_seed(args.seed)
    model = Qwen3VLForConditionalGeneration(cfg)
    with torch.no_grad():
        model.model.visual.pos_embed.weight.mul_(args.pos_scale)
    return model


def samples_of(root, users):
    import pickle
    out = []
    for u in users:
        raw = pickle.loads((root / f"user_{u}.pkl").read_bytes())
        for i, msgs in enumerate(raw):
            for m in msgs:
                for c in m["content"]:
                    if c["type"] == "image":
                        c["image"] = str(root / c["image"])
            out.append(Sample(u, i, f"user_{u}", msgs))
    return out


def coord_positions(tok, labels):
    """Per row: label positions of the coordinate digits."""
    rows = []
    for row in labels:
        ids = [(i, t) for i, t in enumerate(row.tolist()) if t != -100]
        text = [tok.decode([t]) for _, t in ids]
        start = max(j for j, s in enumerate(text) if "[" in s)
        end = max(j for j, s in enumerate(text) if "]" in s)
        rows.append([ids[j][0] for j in range(start + 1, end) if text[j].strip().isdigit()])
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--theta", type=float, default=5e6)
    p.add_argument("--mrope", default="default")
    p.add_argument("--pos-scale", type=float, default=40.0)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--blocks", default="3,5")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train", default="all", help="all | noembed | lm (vision frozen) | lm_noembed | core (no "
                   "embeddings, no lm_head)")
    p.add_argument("--train-samples", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--colours", type=int, default=len(blocks.COLOURS), help="the first N of blocks.COLOURS")
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--inter", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks.COLOURS = dict(list(blocks.COLOURS.items())[:args.colours])
    blocks.BLOCKS = tuple(int(v) for v in args.blocks.split(","))
    root = Path(tempfile.mkdtemp())
    counts = {u: 60 if u <= 4 else args.train_samples for u in range(1, 17)}
    blocks.synthesize_blocks(root, counts, set(), seed=0, size=args.size)  # no habits: global task only
    proc = make_processor(args.size ** 2, args.size ** 2)
    coll = TrainCollator(proc, 4096, padding_mask=False, supervised_index=True)
    train = samples_of(root, range(5, 17))
    test = samples_of(root, range(1, 5))
    dev = torch.device(args.device)
    model = build(args).to(dev)
    for n, prm in model.named_parameters():
        vision = "visual" in n
        embed = "embed_tokens" in n
        head = "lm_head" in n
        prm.requires_grad = {"all": True, "noembed": not embed, "lm": not vision, "core": not embed and not head,
                             "lm_noembed": not vision and not embed}[args.train]
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warm = args.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warm) if args.schedule == "const" else min(1, (s + 1) / warm) * 0.5 * (1 + __import__("math").cos(__import__("math").pi * min(s, args.steps) / args.steps)))
    test_batches = [coll(test[i:i + 32]) for i in range(0, len(test), 32)]
    rng = random.Random(args.seed)
    order = []
    t0 = time.time()
    hist = []

    def to(b):
        return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in b.items()}

    def evaluate():
        model.eval()
        hit = n = 0
        with torch.no_grad():
            for b in test_batches:
                b2 = to(b)
                pos = coord_positions(proc.tokenizer, b["labels"])
                inputs = {k: v for k, v in b2.items() if k not in ("labels", "supervised_index")}
                logits = model(**inputs, use_cache=False).logits
                pred = logits.argmax(-1).cpu()
                for r, ps in enumerate(pos):
                    ok = all(pred[r, q - 1] == b["labels"][r, q] for q in ps)
                    hit += ok
                    n += 1
        model.train()
        return hit / n

    for step in range(1, args.steps + 1):
        if len(order) < args.batch:
            order += rng.sample(train, len(train))
        batch, order = order[:args.batch], order[args.batch:]
        b = to(coll(batch))
        loss, _ = supervised_loss(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate()
            hist.append((step, round(loss.item(), 3), round(acc, 3), round(time.time() - t0, 1)))
            print(args.tag, "step", step, "loss", round(loss.item(), 3), "cell acc", round(acc, 3),
                  "t", round(time.time() - t0, 1), flush=True)
    print("RESULT", json.dumps({"args": vars(args), "hist": hist}), flush=True)


if __name__ == "__main__":
    main()
