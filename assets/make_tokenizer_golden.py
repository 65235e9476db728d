"""Writes assets/tokenizer_golden.json: test strings and the token ids OpenAI's own tokenizer gives them.

The reference is OpenAI CLIP's clip/simple_tokenizer.py (SimpleTokenizer.encode: ftfy + html.unescape
cleaning, the `regex` pre-tokenizer, BPE on assets/bpe_simple_vocab_16e6.txt.gz), so test_tokenizer.py can
check our "openai" text cleaning against it without installing the reference. Run once, from the repo root,
after installing the reference (its torchvision dependency is not needed for the tokenizer file):

    pip install --no-deps clip-anytorch==2.6.0 && python assets/make_tokenizer_golden.py

The strings: fixed edge cases (contractions, curly quotes, `&amp;`, ligatures, fullwidth forms, combining
marks, special-token look-alikes, control and exotic whitespace characters, emoji sequences, long runs), then
deterministic prompt-like word salads, random characters from many scripts, and prompts longer than 77
tokens. test_tokenizer.py checks that the file holds exactly golden_strings().
"""

import importlib.metadata
import importlib.util
import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
GOLDEN = ASSETS / "tokenizer_golden.json"

WORDS = ["a", "photo", "of", "the", "cat", "astronaut", "riding", "horse", "on", "mars", "don't", "it's",
         "we'll", "I'M", "8k", "4K", "HDR", "trending", "artstation", "Greg", "Rutkowski", "--ar", "16:9",
         "(masterpiece:1.2)", "[blue|red]", "{x}", "U.S.A.", "e-mail", "#hashtag", "@user", "$100", "50%",
         "C++", "3.14159", "1,000,000", "naïve", "café", "Über", "façade", "jalapeño", "smørrebrød",
         "Ελληνικά", "ΣΟΦΙΑ", "русский", "日本語",
         "東京タワー", "中文", "한국어", "العربية", "עברית", "हिन्दी", "ไทย", "🐱", "🚀", "👍🏽", "❤️", "🇯🇵",
         "👨‍👩‍👧", "™", "©", "°C", "½", "²", "①", "Ⅻ", "ﬁ", "ＡＢＣ１２３", "’s", "“hi”", "&amp;", "&lt;3",
         "<|endoftext|>", "...", "!!!", "?!", "--", "—", "…", "'''", "\\n", "a_b", "x^2", "+/-", "~~~",
         "**bold**"]
SEPARATORS = [" ", " ", " ", "  ", ", ", ",", "\t", "\n", "", " \u00a0", "\u3000", " \r\n "]
CHAR_RANGES = [(0x20, 0x7E), (0xA0, 0x17F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
               (0x900, 0x97F), (0x2000, 0x206F), (0x2100, 0x22FF), (0x3040, 0x30FF), (0x4E00, 0x4FFF),
               (0xAC00, 0xAD00), (0xFF00, 0xFFEF), (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF)]
FIXED = ["", " ", "   \t\n ", "a photo of a cat", "A  Photo OF a CAT!", "an astronaut riding a horse on mars",
         "hello world", "don't", "1234", "don’t", "“quoted”", "&amp; &lt;b&gt;", "ﬁne ﬂowers", "ＡＢＣ１２３",
         "cafe\u0301 vs café", "e\u0301\u0301", "İstanbul ΣΟΦΙΑ ǅ", "I'M YOU'LL it's 'S", "<|endoftext|> hi",
         "<|startoftext|>x<|endoftext|>", "<|ENDOFTEXT|>", "a\u200bb x\u00adx", "a\x1cb\x1fc", "a\u0345b",
         "\x00\x07 control", "\u0085next line", "mojibake Ã© Ã¼", "🇫🇷 👨‍👩‍👧 🐱👍🏽", "हिन्दी ไทย",
         "tab\tnew\nline\r\n  x\xa0y\u3000z\u2028w", "x" * 300, "1" * 100, "!" * 90, "ab" * 200,
         # the HPSv2 reward test's prompts (test_rewards.py)
         "a cat &amp; a dog", "an astronaut riding a horse on mars & a dog " * 12]


def is_plain(text: str) -> bool:
    """Neither ftfy nor html.unescape changes it and it has no special-token look-alike (whose matching
    differs, e.g. "<|ENDOFTEXT|>"): both cleaning modes must give the same ids."""
    printable = all(c.isprintable() or c in " \t\n\r" for c in text)
    return text.isascii() and printable and "&" not in text and "<|" not in text


def golden_strings(count: int = 322) -> list[str]:
    """Distinct deterministic strings: fixed edge cases, prompt-like word salads, random characters, long
    prompts."""
    plain_words = [word for word in WORDS if is_plain(word)]
    plain_separators = [separator for separator in SEPARATORS if separator.isascii()]
    rng = random.Random(0)
    strings = dict.fromkeys(FIXED)  # an ordered set
    while len(strings) < count:
        kind = len(strings) % 4
        if kind in (0, 1):  # prompt-like: plain ASCII ones, and ones with the whole word pool
            words, separators = (plain_words, plain_separators) if kind == 0 else (WORDS, SEPARATORS)
            n = rng.randint(1, 25)
            text = "".join(rng.choice(words) + rng.choice(separators) for _ in range(n))
        elif kind == 2:  # random characters from many scripts and symbol blocks
            text = "".join(chr(rng.randint(*rng.choice(CHAR_RANGES))) for _ in range(rng.randint(1, 40)))
        else:  # long prompt: more than 77 tokens
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120)))
        strings[text] = None
    return list(strings)


def openai_simple_tokenizer():
    """SimpleTokenizer from the installed clip-anytorch, loaded by file path (`import clip` would find our
    clip.py, and the package's __init__ imports torchvision)."""
    try:
        distribution = importlib.metadata.distribution("clip-anytorch")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("the reference is missing: pip install --no-deps clip-anytorch==2.6.0") from None
    path = Path(distribution.locate_file("clip/simple_tokenizer.py"))
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(ASSETS / "bpe_simple_vocab_16e6.txt.gz")), distribution.version


def main():
    tokenizer, version = openai_simple_tokenizer()
    ftfy, regex = (importlib.metadata.version(name) for name in ("ftfy", "regex"))
    entries = [{"text": text, "openai_ids": tokenizer.encode(text)} for text in golden_strings()]
    header = {"source": f"OpenAI CLIP clip/simple_tokenizer.py SimpleTokenizer.encode (clip-anytorch "
                        f"{version}, ftfy {ftfy}, regex {regex}), assets/bpe_simple_vocab_16e6.txt.gz",
              "made_by": "python assets/make_tokenizer_golden.py",
              "openai_ids": "token ids without <|startoftext|> / <|endoftext|>, not truncated"}
    # one entry per line; ASCII escapes keep invisible differences (NFC vs NFD, odd spaces) visible and exact
    lines = [json.dumps(entry, ensure_ascii=True) for entry in entries]
    text = json.dumps(header, indent=1)[:-2] + ',\n "strings": [\n' + ",\n".join(lines) + "\n]}\n"
    json.loads(text)  # well-formed
    GOLDEN.write_text(text, encoding="ascii")
    print(f"wrote {GOLDEN} ({len(entries)} strings)")


if __name__ == "__main__":
    main()
