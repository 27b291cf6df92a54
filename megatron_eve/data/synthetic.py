"""A small synthetic image-text corpus: coloured shapes at positions, with captions (plain
template) and questions and answers (vicuna_v1), in LLaVA's record format. It drives the tests,
the benchmarks and the CPU quick-start; answers depend on the pixels, so a model must look.
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, Iterable, List, Tuple

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
          "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}
# (width, height) choices: square, landscape and portrait images of assorted sizes.
SIZES = ((224, 224), (320, 240), (240, 320), (400, 200), (160, 280), (300, 300), (512, 384))


def draw(shape: str, colour: str, place: str, size: Tuple[int, int], seed: int):
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    width, height = size
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", size, background)
    pen = ImageDraw.Draw(image)
    cx, cy = PLACES[place][0] * width, PLACES[place][1] * height
    r = min(width, height) * rng.uniform(0.12, 0.2)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _scene(rng: random.Random) -> Dict[str, str]:
    return {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "place": rng.choice(list(PLACES))}


def caption(scene: Dict[str, str]) -> str:
    return f"A {scene['colour']} {scene['shape']} in the {scene['place']} of the picture."


def questions(scene: Dict[str, str]) -> List[Tuple[str, str]]:
    return [
        ("What color is the shape?", scene["colour"].capitalize() + "."),
        ("What shape is in the picture?", f"A {scene['shape']}."),
        ("Where is the shape?", f"In the {scene['place']}."),
    ]


def make_corpus(root: str, count: int, kind: str, seed: int = 0, text_only_fraction: float = 0.0) -> str:
    """Write `count` images under root/images and a JSON list of records; returns the JSON path.

    kind "caption": plain-template records; kind "qa": multi-turn vicuna_v1 records (and some
    text-only ones when text_only_fraction > 0).
    """
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    records = []
    for index in range(count):
        scene = _scene(rng)
        name = f"images/{kind}_{seed}_{index:06d}.png"
        if kind == "qa" and rng.random() < text_only_fraction:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            records.append({"id": f"{kind}-{index}", "conversations": [
                {"from": "human", "value": f"What is {a} plus {b}?"},
                {"from": "gpt", "value": f"{a + b}."}]})
            continue
        draw(scene["shape"], scene["colour"], scene["place"], rng.choice(SIZES), seed * 1_000_003 + index).save(
            os.path.join(root, name))
        if kind == "caption":
            turns = [{"from": "human", "value": "<image>\nDescribe the picture."},
                     {"from": "gpt", "value": caption(scene)}]
        else:
            asked = rng.sample(questions(scene), k=rng.randint(1, 3))
            turns = []
            for turn, (question, answer) in enumerate(asked):
                prompt = ("<image>\n" + question) if turn == 0 else question
                turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
        records.append({"id": f"{kind}-{index}", "image": name, "conversations": turns})
    path = os.path.join(root, f"{kind}.json")
    with open(path, "w") as handle:
        json.dump(records, handle, indent=1)
    return path


def tokenizer_texts(records: Iterable[Dict]) -> Iterable[str]:
    """Every string a tokenizer for this corpus should know, templates' fixed text included."""
    from megatron_eve.data.templates import VICUNA_SYSTEM

    yield VICUNA_SYSTEM + " USER: ASSISTANT:"
    for record in records:
        for turn in record["conversations"]:
            yield turn["value"].replace("<image>", "")
