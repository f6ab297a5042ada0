"""Synthetic users for `pigg demo`: a few large coloured blocks on a grid, named by their colour.

The phone screens of `pigg.offline.synth` name most elements by the text drawn on them, which a
tiny model with a random, frozen vision tower cannot read, so on them a tiny model learns where
elements usually are and little more. Here every command names what the pixels show: "tap the red
block" on a screen of two or three solid blocks of four colours, each on its own cell of a 3x3 grid. A colour
survives the random patch embedding, and the vision tower's position embeddings tell the cells
apart, so the answer can be learned from the pixels; a point that ignores them (a prior) hits one
cell in nine at best.

Half of the users have habits: two private words for colours ("the usual" means red to one user
and green to another), which about half of their commands use. A model trained on everyone cannot
tell what the words mean; a model fine-tuned on the user's own samples can, and a fixed point per
user cannot (the blocks move from screen to screen). The other users speak plainly.

Files are the same as `synth.synthesize` writes: `user_{id}.pkl`, `images/user_{id}/*.png` and
`users.json` (with `habits` and `aliases` per user); samples are in the seed's format.
"""
import json
import pickle
from pathlib import Path

from PIL import Image, ImageDraw

from pigg.offline.synth import format_answer, make_prompt, user_rng

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 230), "yellow": (240, 210, 0)}
GRID = 3
BLOCKS = (2, 3)  # fewest and most blocks on a screen
BLOCK_SHARE = 0.7  # of a cell's side
ALIAS_WORDS = ("the usual", "my colour")
PLAIN = ("tap the {} block", "press the {} block", "click the {} square", "select the {} one")
WITH_ALIAS = ("tap {}", "press {}", "{}, please", "open {}")
ALIAS_SHARE = 0.5  # of a habit user's commands


def cell_centre(cell: int, size: int, grid: int) -> tuple[float, float]:
    row, col = divmod(cell, grid)
    side = size / grid
    return (col + 0.5) * side, (row + 0.5) * side


def draw_screen(blocks: dict, size: int, grid: int) -> Image.Image:
    """A light screen with a solid block of each {cell: colour}."""
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    half = size / grid * BLOCK_SHARE / 2
    for cell, colour in blocks.items():
        cx, cy = cell_centre(cell, size, grid)
        draw.rectangle((round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1),
                       fill=COLOURS[colour])
    return img


def make_aliases(seed: int, user: int) -> dict:
    """Two private words for two different colours, drawn per user: a word means different colours to most
    users, so only the user's own samples tell what it means."""
    colours = user_rng(seed, user, "aliases").sample(sorted(COLOURS), len(ALIAS_WORDS))
    return dict(zip(ALIAS_WORDS, colours))


def user_samples(out_dir: Path, user: int, n: int, aliases: dict, seed: int, size: int, grid: int) -> list:
    rng = user_rng(seed, user, "blocks")
    image_dir = out_dir / "images" / f"user_{user}"
    image_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    while len(samples) < n:
        colours = rng.sample(sorted(COLOURS), rng.randint(*BLOCKS))
        word = rng.choice(sorted(aliases)) if aliases and rng.random() < ALIAS_SHARE else None
        if word and aliases[word] not in colours:
            colours[0] = aliases[word]
        blocks = dict(zip(rng.sample(range(grid * grid), len(colours)), colours))
        name = f"{len(samples):05d}.png"
        draw_screen(blocks, size, grid).save(image_dir / name, format="PNG")
        if word:
            colour = aliases[word]
            cell = next(c for c, col in blocks.items() if col == colour)
            command = rng.choice(WITH_ALIAS).format(word)
        else:
            cell, colour = rng.choice(sorted(blocks.items()))
            command = rng.choice(PLAIN).format(colour)
        x, y = (round(v / size * 1000) for v in cell_centre(cell, size, grid))
        samples.append([
            {"role": "system", "content": [{"type": "image", "image": f"images/user_{user}/{name}"},
                                           {"type": "text", "text": make_prompt(command)}]},
            {"role": "assistant", "content": [{"type": "text", "text": format_answer(f"{colour} block", x, y)}]},
        ])
    return samples


def synthesize_blocks(out_dir, samples_per_user: dict, habit_users: set, seed: int = 0, size: int = 96,
                      grid: int = GRID) -> list:
    """Write `user_{id}.pkl` for each user in `samples_per_user` ({user: count}), its PNGs and users.json;
    the users in `habit_users` get private words. Returns the pickle paths."""
    if size < 96 or min(samples_per_user.values(), default=0) < 1 or not habit_users <= set(samples_per_user):
        raise ValueError(f"need size >= 96, >= 1 sample per user, habit users among the users; got size {size}, "
                         f"{samples_per_user}, habit users {sorted(habit_users)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, summary = [], {}
    for user, n in sorted(samples_per_user.items()):
        aliases = make_aliases(seed, user) if user in habit_users else {}
        samples = user_samples(out_dir, user, n, aliases, seed, size, grid)
        path = out_dir / f"user_{user}.pkl"
        with open(path, "wb") as f:
            pickle.dump(samples, f, protocol=4)
        paths.append(path)
        summary[str(user)] = {"habits": bool(aliases), "aliases": aliases, "samples": n}
    (out_dir / "users.json").write_text(json.dumps(summary, indent=1) + "\n")
    return paths
