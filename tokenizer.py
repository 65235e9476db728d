"""The CLIP tokenizer: byte-level BPE text -> the 77 token ids SD1.5's text encoder reads.

CLIP (Radford et al. 2021) Sec. 2.4: "lower-cased byte pair encoding (BPE) representation of the
text with a 49,152 vocab size", bracketed with [SOS] / [EOS] (<|startoftext|> = 49406, <|endoftext|>
= 49407). BPE (Sennrich et al. 2016) runs on UTF-8 bytes mapped to printable characters, one
pre-token at a time, merging the lowest-ranked adjacent pair until none applies; a word-final "</w>"
marks the end of a word. Upstream read (not copied): openai/CLIP clip/simple_tokenizer.py,
transformers tokenization_clip.py.

Deviations from the official code (OpenAI clip, transformers):
1. Two text-cleaning modes, as the references disagree on e.g. "don’t", "&amp;", fullwidth forms,
   ligatures. "hf" (default), as transformers (SD1.5 pipelines, PickScore): NFC, whitespace
   collapsed, char-by-char lower-casing, special tokens only verbatim in the raw text. "openai", as
   OpenAI clip / open_clip (HPSv2): ftfy.fix_text (NFC, with a warning, without the optional ftfy),
   html.unescape twice, whitespace collapsed, str.lower(), special tokens recognised after
   lower-casing.
2. The pre-tokenizer regex uses Python's `re`; the \\p{L} / \\p{N} classes it lacks are built once
   from `unicodedata` (Unicode 14 on Python 3.11; the `regex` module may know newer code points).
"""

import gzip
import html
import itertools
import json
import re
import sys
import unicodedata
import warnings
from functools import lru_cache
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_BPE = Path(__file__).with_name("assets") / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character: printable Latin-1 bytes as themselves, the other 68 as
    chr(256 + n)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), 256),
    ]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


# Unicode White_Space: `\s` in `regex` and transformers; Python's `re` (OpenAI's clean) adds
# \x1c-\x1f.
WHITESPACE = "\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
SPECIAL_TOKENS = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")


def major_category(code_point: int) -> str:
    """The first letter of a code point's Unicode category: "L" for letters, "N" for numbers."""
    return unicodedata.category(chr(code_point))[0]


@lru_cache
def pretokenizer(mode: str = "hf") -> re.Pattern:
    """OpenAI's split regex; \\p{L} (letters) and \\p{N} (numbers) spelled out as ranges
    (deviation 2)."""
    ranges = {"L": "", "N": ""}  # runs of consecutive code points of one category, as a-b
    for kind, run in itertools.groupby(range(sys.maxunicode + 1), major_category):
        if kind in ranges:
            codes = list(run)
            ranges[kind] += f"{re.escape(chr(codes[0]))}-{re.escape(chr(codes[-1]))}"
    letter, number = ranges["L"], ranges["N"]
    specials = r"<\|startoftext\|>|<\|endoftext\|>|" if mode == "openai" else ""
    # OpenAI's regex.IGNORECASE makes U+0345 (it case-folds to a letter) match no branch, so the
    # character is dropped.
    dropped = "\u0345" if mode == "openai" else ""
    # Specials, English contractions, letter runs, single digits, runs of other non-space symbols.
    return re.compile(rf"{specials}'s|'t|'re|'ve|'m|'ll|'d"
                      rf"|[{letter}]+|[{number}]|[^{WHITESPACE}{letter}{number}{dropped}]+")


def clean_text(text: str, mode: str = "hf") -> str:
    """Text normalisation before the split (deviation 1)."""
    if mode == "openai":  # OpenAI's basic_clean + whitespace_clean
        try:
            import ftfy
            text = ftfy.fix_text(text)
        except ImportError:  # CLIPTokenizer warns
            text = unicodedata.normalize("NFC", text)
        text = re.sub(r"\s+", " ", html.unescape(html.unescape(text)))
    elif mode == "hf":  # transformers' normalizers: NFC, Replace(\s+, " "), Lowercase
        text = re.sub(f"[{WHITESPACE}]+", " ", unicodedata.normalize("NFC", text))
        # Lowercasing maps char by char: no word-final ς as in str.lower().
        text = text.replace("Σ", "σ")
    else:
        raise ValueError(f"text cleaning mode must be 'hf' or 'openai', got {mode!r}")
    return text.strip().lower()


class CLIPTokenizer:
    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        text_cleaning: str = "hf",
        max_length: int = 77,
    ):
        self.vocab = vocab
        self.merges = merges
        self.text_cleaning = text_cleaning
        self.max_length = max_length
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.byte_to_char = bytes_to_unicode()
        # Without ftfy, the ligature is not split.
        if text_cleaning == "openai" and clean_text("ﬁ", "openai") != "fi":
            warnings.warn(
                "ftfy is not installed: 'openai' cleaning applies NFC instead of ftfy.fix_text",
                stacklevel=2,
            )
        clean_text("", text_cleaning)  # validates the mode now

    @classmethod
    def from_files(cls, vocab_json, merges_txt, **kwargs) -> "CLIPTokenizer":
        """HF format (SD1.5 `tokenizer/vocab.json` + `merges.txt`)."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        if BOS not in vocab or EOS not in vocab:
            raise ValueError(f"{vocab_json}: not a CLIP vocabulary (no {BOS} or {EOS} token)")
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_tokenizer_json(cls, path, **kwargs) -> "CLIPTokenizer":
        """HF "fast" format (tokenizer.json); its merges are "a b" strings or [a, b] pairs,
        depending on the writer."""
        model = json.loads(Path(path).read_text(encoding="utf-8")).get("model", {})
        if model.get("type") != "BPE" or BOS not in model.get("vocab", {}):
            raise ValueError(f"{path}: not a CLIP BPE tokenizer.json")
        merges = [tuple(m.split() if isinstance(m, str) else m) for m in model["merges"]]
        return cls(model["vocab"], merges, **kwargs)

    @classmethod
    def default(cls, **kwargs) -> "CLIPTokenizer":
        """OpenAI format (the bundled file, SD1.5's vocabulary): the vocabulary is rebuilt from the
        merges."""
        lines = gzip.open(DEFAULT_BPE).read().decode("utf-8").split("\n")
        # The first line is a header; the vocabulary uses 48,894 merges.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        chars = list(bytes_to_unicode().values())
        tokens = [
            *chars,
            *(c + "</w>" for c in chars),
            *("".join(pair) for pair in merges),
            BOS,
            EOS,
        ]
        return cls({token: i for i, token in enumerate(tokens)}, merges, **kwargs)

    def bpe(self, word: str) -> list[str]:
        """BPE on one pre-token (as byte-characters): merge the lowest-ranked adjacent pair while
        one is left."""
        # The word-end marker makes "cat" and "cat</w>" different.
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            # the leftmost lowest-ranked pair; a pair containing a merge result always ranks after
            # the merge, so this merges every occurrence of the best pair left to right, like
            # OpenAI's loop
            pairs = list(zip(symbols, symbols[1:]))
            i = min(range(len(pairs)), key=lambda j: self.ranks.get(pairs[j], float("inf")))
            if pairs[i] not in self.ranks:
                break
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids without bos/eos."""
        mode = self.text_cleaning
        ids = []
        for segment in SPECIAL_TOKENS.split(text) if mode == "hf" else [text]:  # deviation 1
            special = segment in (BOS, EOS)
            pieces = [segment] if special else pretokenizer(mode).findall(clean_text(segment, mode))
            for piece in pieces:
                if piece in (BOS, EOS):
                    ids.append(self.vocab[piece])
                else:
                    word = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
                    ids.extend(self.vocab[symbol] for symbol in self.bpe(word))
        return ids

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """[bos] + tokens (truncated to max_length - 2) + [eos], eos-padded -> LongTensor
        [B, max_length]."""
        rows = []
        for prompt in prompts:
            ids = [self.bos_id, *self.encode(prompt)[: self.max_length - 2], self.eos_id]
            rows.append(ids + [self.eos_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)
