"""How walkthrough.py shows a walk: numbered blocks, each an equation with its source, the code
lines that implement it (read live from the source), the values on this step and the papers'
identities checked; the pictures; a counter of a module's forward calls.

A check's tolerance is a float32 rounding bound, Higham's gamma_n = n u / (1 - n u) with the unit
roundoff u = 2^-24: n roundings in a row stay within gamma_n relative error.
"""

import inspect
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw

UNIT_ROUNDOFF = torch.finfo(torch.float32).eps / 2  # u = 2^-24


def gamma(n: int) -> float:
    """Higham's bound on the relative error of n float32 roundings in a row."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def code_line(function, marker: str) -> tuple[str, int, str] | None:
    """(file, line number, text) of the first line of `function`'s source containing `marker`."""
    function = inspect.unwrap(function)
    lines, start = inspect.getsourcelines(function)
    name = Path(inspect.getsourcefile(function)).name  # the library is one folder
    found = [(start + offset, text.strip()) for offset, text in enumerate(lines) if marker in text]
    return (name, *found[0]) if found else None


def describe(value) -> str:
    """A tensor's shape and norm (values if at most 4); a float's 6 digits; a tuple side by side."""
    if isinstance(value, tuple):
        return " | ".join(describe(item) for item in value)
    if torch.is_tensor(value):
        value = value.detach().float().cpu()
        if value.numel() <= 4:
            return ", ".join(f"{v:.6g}" for v in value.flatten().tolist())
        return f"{list(value.shape)} norm {value.norm():.5g}"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class Block:
    """One numbered step of a walk: its equation and source, code lines, values and checks."""

    def __init__(self, number: str, title: str, source: str, equation: str, code):
        self.number = number
        self.title = title
        self.source = source
        self.equation = equation
        self.code = [(marker, code_line(function, marker)) for function, marker in code]
        self.values = []
        self.checks = []

    def value(self, name: str, value) -> "Block":
        self.values.append((name, describe(value)))
        return self

    def check(self, claim: str, residual, tolerance: float) -> "Block":
        residual = abs(float(residual))
        self.checks.append((claim, residual, tolerance, residual <= tolerance))
        return self

    def show(self):
        equation = self.equation.replace("\n", "\n      ")
        print(f"\n{self.number} {self.title}   [{self.source}]\n      {equation}")
        for marker, found in self.code:
            print("    code  {}:{}  {}".format(*found) if found else f"    NO CODE {marker}")
        for name, text in self.values:
            print(f"    {name:<29}  {text}")
        for claim, residual, tolerance, ok in self.checks:
            print(f"    {'PASS' if ok else 'FAIL'}  {claim}: {residual:.3g} <= {tolerance:.3g}")


class Walk(list):
    """The blocks of one walk, numbered "1.1", "1.2", ... as they are added, and its pictures."""

    def __init__(self, number: int, title: str):
        super().__init__()
        self.number = number
        self.title = title
        self.pictures = []

    def block(self, title: str, source: str, equation: str, *code) -> Block:
        self.append(Block(f"{self.number}.{len(self) + 1}", title, source, equation, code))
        return self[-1]

    def show(self):
        print(f"\n==== {self.number}. {self.title}")
        for block in self:
            block.show()
        print("".join(f"\n    picture: {path}" for path in self.pictures))


@contextmanager
def counted_calls(module):
    """`with counted_calls(sd.unet) as calls:` ... len(calls): the number of forward calls."""
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def save_strip(path: Path, tiles: list[tuple[str, torch.Tensor]], size: int = 128) -> Path:
    """Labelled square images [3 or 1, h, w] in [0, 1], upscaled (nearest) to `size`, in a row."""
    strip = Image.new("RGB", (len(tiles) * (size + 8), size + 16), "white")
    for index, (label, image) in enumerate(tiles):
        pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        picture = Image.fromarray(pixels.expand(3, -1, -1).permute(1, 2, 0).numpy())
        strip.paste(picture.resize((size, size), Image.NEAREST), (index * (size + 8), 0))
        ImageDraw.Draw(strip).text((index * (size + 8), size + 2), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path
