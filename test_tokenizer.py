"""Tests for tokenizer.py on the real CLIP vocabulary (assets/bpe_simple_vocab_16e6.txt.gz).

References: the ids OpenAI's SimpleTokenizer gives for 322 strings, committed in
assets/tokenizer_golden.json (so the tests need no extra install), and transformers' CLIPTokenizer
reading the files that conftest.save_hf_tokenizer wrote. Deviations: none.

The golden file was written once by this file's main() from the reference, OpenAI CLIP's
clip/simple_tokenizer.py (SimpleTokenizer.encode: ftfy + html.unescape cleaning, the `regex`
pre-tokenizer, BPE on the same vocab); to regenerate it (its torchvision dependency is not needed
for the tokenizer file):

    pip install --no-deps clip-anytorch==2.6.0 && python test_tokenizer.py

The strings: fixed edge cases (contractions, curly quotes, `&amp;`, ligatures, fullwidth forms,
combining marks, special-token look-alikes, control and exotic whitespace characters, emoji
sequences, long runs), then deterministic prompt-like word salads, random characters from many
scripts, and prompts over 77 tokens.
"""

import importlib.metadata
import importlib.util
import json
import random
import re
import sys
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch

from testkit import hf_clip_tokenizer, save_hf_tokenizer, tokenizer_golden
from tokenizer import CLIPTokenizer, clean_text, pretokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
GOLDEN = ASSETS / "tokenizer_golden.json"

WORDS = ["a", "photo", "of", "the", "cat", "astronaut", "riding", "horse", "on", "mars",
         "don't", "it's", "we'll", "I'M", "8k", "4K", "HDR", "trending", "artstation",
         "Greg", "Rutkowski", "--ar", "16:9", "(masterpiece:1.2)", "[blue|red]", "{x}",
         "U.S.A.", "e-mail", "#hashtag", "@user", "$100", "50%", "C++", "3.14159",
         "1,000,000", "naïve", "café", "Über", "façade", "jalapeño", "smørrebrød",
         "Ελληνικά", "ΣΟΦΙΑ", "русский", "日本語", "東京タワー", "中文", "한국어",
         "العربية", "עברית", "हिन्दी", "ไทย", "🐱", "🚀", "👍🏽", "❤️", "🇯🇵", "👨‍👩‍👧",
         "™", "©", "°C", "½", "²", "①", "Ⅻ", "ﬁ", "ＡＢＣ１２３", "’s", "“hi”", "&amp;",
         "&lt;3", "<|endoftext|>", "...", "!!!", "?!", "--", "—", "…", "'''", "\\n", "a_b",
         "x^2", "+/-", "~~~", "**bold**"]
SEPARATORS = [" ", " ", " ", "  ", ", ", ",", "\t", "\n", "", " \u00a0", "\u3000", " \r\n "]
CHAR_RANGES = [(0x20, 0x7E), (0xA0, 0x17F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
               (0x590, 0x6FF), (0x900, 0x97F), (0x2000, 0x206F), (0x2100, 0x22FF),
               (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFF00, 0xFFEF),
               (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF)]
FIXED = ["", " ", "   \t\n ", "a photo of a cat", "A  Photo OF a CAT!",
         "an astronaut riding a horse on mars", "hello world", "don't", "1234", "don’t",
         "“quoted”", "&amp; &lt;b&gt;", "ﬁne ﬂowers", "ＡＢＣ１２３", "cafe\u0301 vs café",
         "e\u0301\u0301", "İstanbul ΣΟΦΙΑ ǅ", "I'M YOU'LL it's 'S", "<|endoftext|> hi",
         "<|startoftext|>x<|endoftext|>", "<|ENDOFTEXT|>", "a\u200bb x\u00adx",
         "a\x1cb\x1fc", "a\u0345b", "\x00\x07 control", "\u0085next line", "mojibake Ã© Ã¼",
         "🇫🇷 👨‍👩‍👧 🐱👍🏽", "हिन्दी ไทย", "tab\tnew\nline\r\n  x\xa0y\u3000z\u2028w",
         "x" * 300, "1" * 100, "!" * 90, "ab" * 200,
         # The HPSv2 reward test's prompts (test_rewards.py).
         "a cat &amp; a dog", "an astronaut riding a horse on mars & a dog " * 12]


def is_plain(text: str) -> bool:
    """Neither ftfy nor html.unescape changes it and it has no special-token look-alike (whose
    matching differs, e.g. "<|ENDOFTEXT|>"): both cleaning modes must give the same ids."""
    printable = all(c.isprintable() or c in " \t\n\r" for c in text)
    return text.isascii() and printable and "&" not in text and "<|" not in text


def golden_strings(count: int = 322) -> list[str]:
    """Distinct deterministic strings: fixed edge cases, prompt-like word salads, random characters,
    long prompts."""
    plain_words = [word for word in WORDS if is_plain(word)]
    plain_separators = [separator for separator in SEPARATORS if separator.isascii()]
    rng = random.Random(0)
    strings = dict.fromkeys(FIXED)  # an ordered set
    while len(strings) < count:
        kind = len(strings) % 4
        if kind in (0, 1):  # prompt-like: plain ASCII ones, and ones with the whole word pool
            words, separators = (
                (plain_words, plain_separators) if kind == 0 else (WORDS, SEPARATORS)
            )
            text = "".join(
                rng.choice(words) + rng.choice(separators) for _ in range(rng.randint(1, 25))
            )
        elif kind == 2:  # random characters from many scripts and symbol blocks
            text = "".join(
                chr(rng.randint(*rng.choice(CHAR_RANGES))) for _ in range(rng.randint(1, 40))
            )
        else:  # long prompt: more than 77 tokens
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120)))
        strings[text] = None
    return list(strings)


def openai_simple_tokenizer():
    """SimpleTokenizer from the installed clip-anytorch, loaded by file path (`import clip` would
    find our clip.py, and the package's __init__ imports torchvision)."""
    try:
        distribution = importlib.metadata.distribution("clip-anytorch")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            "the reference is missing: pip install --no-deps clip-anytorch==2.6.0"
        ) from None
    path = Path(distribution.locate_file("clip/simple_tokenizer.py"))
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.SimpleTokenizer(str(ASSETS / "bpe_simple_vocab_16e6.txt.gz"))
    return reference, distribution.version


def main():
    tokenizer, version = openai_simple_tokenizer()
    ftfy, regex = (importlib.metadata.version(name) for name in ("ftfy", "regex"))
    entries = [{"text": text, "openai_ids": tokenizer.encode(text)} for text in golden_strings()]
    header = {
        "source": f"OpenAI CLIP clip/simple_tokenizer.py SimpleTokenizer.encode (clip-anytorch "
        f"{version}, ftfy {ftfy}, regex {regex}), assets/bpe_simple_vocab_16e6.txt.gz",
        "made_by": "python test_tokenizer.py (regenerates this file)",
        "openai_ids": "token ids without <|startoftext|> / <|endoftext|>, not truncated",
    }
    # one entry per line; ASCII escapes keep invisible differences (NFC vs NFD, odd spaces) visible
    # and exact
    lines = [json.dumps(entry, ensure_ascii=True) for entry in entries]
    text = json.dumps(header, indent=1)[:-2] + ',\n "strings": [\n' + ",\n".join(lines) + "\n]}\n"
    json.loads(text)  # well-formed
    GOLDEN.write_text(text, encoding="ascii")
    print(f"wrote {GOLDEN} ({len(entries)} strings)")


@pytest.fixture(scope="module")
def golden():
    """{text: OpenAI's ids without bos / eos}, in the file's order."""
    return {entry["text"]: entry["openai_ids"] for entry in tokenizer_golden()}


@pytest.fixture(scope="module")
def hf_reference():
    return hf_clip_tokenizer()


def test_golden_file_holds_the_scripts_strings(golden):
    assert list(golden) == golden_strings()
    assert len(golden) == 322 and "&amp; &lt;b&gt;" in golden and "don\u2019t" in golden
    assert golden["a photo of a cat"] == [320, 1125, 539, 320, 2368]
    assert golden["&amp; &lt;b&gt;"] == CLIPTokenizer.default().encode("& <b>")  # html.unescape'd


def test_known_token_ids():
    tokenizer = CLIPTokenizer.default()
    assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tokenizer.encode("A  Photo OF a CAT!") == [320, 1125, 539, 320, 2368, 256]
    astronaut = [550, 18376, 6765, 320, 4558, 525, 7496]
    assert tokenizer.encode("an astronaut riding a horse on mars") == astronaut
    assert tokenizer.encode("don't") == [847, 713]
    assert tokenizer.encode("1234") == [272, 273, 274, 275]
    ids = tokenizer(["a photo of a cat", ""])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()
    assert ids[1].tolist() == [49406] + [49407] * 76  # the unconditional (CFG) prompt
    long = tokenizer(["cat " * 100])[0]
    # Truncated, eos kept last.
    assert long[0] == 49406 and long[-1] == 49407 and (long[1:-1] == 2368).all()


def test_tokenizer_matches_transformers(golden, hf_reference):
    """Default ("hf") cleaning: identical ids to transformers' CLIPTokenizer (what SD1.5 pipelines
    use)."""
    strings = list(golden)
    ours = CLIPTokenizer.default()(strings)
    expected = hf_reference(strings, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt")
    mismatches = [s for s, a, b in zip(strings, ours, expected.input_ids) if not torch.equal(a, b)]
    assert mismatches == []


def test_tokenizer_json_written_by_transformers_loads(golden, hf_reference, tmp_path):
    """transformers >= 5 save_pretrained writes only tokenizer.json: the same vocabulary and
    merges."""
    hf_reference.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists()
    strings = list(golden)[:50]
    assert torch.equal(CLIPTokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")(strings),
                       CLIPTokenizer.default()(strings))
    with pytest.raises(ValueError, match="not a CLIP BPE tokenizer.json"):
        (tmp_path / "other.json").write_text('{"model": {"type": "WordPiece"}}')
        CLIPTokenizer.from_tokenizer_json(tmp_path / "other.json")


def openai_template(ids):
    ids = [49406, *ids[:75], 49407]
    return ids + [49407] * (77 - len(ids))


def test_tokenizer_matches_openai(golden):
    """"openai" cleaning (ftfy + html.unescape): identical ids to OpenAI's SimpleTokenizer."""
    tokenizer = CLIPTokenizer.default(text_cleaning="openai")
    mismatches = [text for text, ids in golden.items() if tokenizer.encode(text) != ids]
    assert mismatches == []
    expected = torch.tensor([openai_template(ids) for ids in golden.values()])
    assert torch.equal(tokenizer(list(golden)), expected)


def test_the_two_cleaning_modes_differ_only_where_the_references_do(golden, hf_reference):
    hf_mode, openai_mode = CLIPTokenizer.default(), CLIPTokenizer.default(text_cleaning="openai")
    for text in ["don’t", "&amp;", "ＡＢＣ", "ﬁne"]:  # ftfy / html.unescape change these
        assert hf_mode.encode(text) != openai_mode.encode(text)
        assert hf_mode.encode(text) == hf_reference(text).input_ids[1:-1]
    plain = [text for text in golden if is_plain(text)]
    assert len(plain) > 80
    assert all(hf_mode.encode(text) == golden[text] for text in plain)


def test_openai_mode_without_ftfy(monkeypatch, golden):
    """Without ftfy, "openai" cleaning warns and still matches OpenAI wherever ftfy would only apply
    NFC."""
    import ftfy

    monkeypatch.setitem(sys.modules, "ftfy", None)  # makes `import ftfy` raise ImportError
    with pytest.warns(UserWarning, match="ftfy"):
        tokenizer = CLIPTokenizer.default(text_cleaning="openai")
    collapse = lambda text: re.sub(r"\s+", " ", text)  # noqa: E731 (whitespace is collapsed anyway)
    untouched = [text for text in golden
                 if collapse(ftfy.fix_text(text)) == collapse(unicodedata.normalize("NFC", text))]
    assert len(untouched) > 100
    assert all(tokenizer.encode(text) == golden[text] for text in untouched)


def test_pretokenizer_matches_openai_regex_on_every_code_point():
    """Our stdlib-`re` split equals OpenAI's `regex` pattern for every code point assigned in this
    Python's Unicode version (newer code points can differ: deviation 2 in tokenizer.py)."""
    import regex

    reference = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
        r"[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )
    assigned = [
        chr(c)
        for c in range(sys.maxunicode + 1)
        if unicodedata.category(chr(c)) not in ("Cn", "Cs")
    ]
    text = " ".join(f"a{c}!{c}" for c in assigned)  # tells letter / number / other / dropped apart
    assert pretokenizer("openai").findall(text) == reference.findall(text)


def test_vocabulary_files_round_trip(tmp_path):
    tokenizer = CLIPTokenizer.default()
    assert len(tokenizer.vocab) == 49408 and len(tokenizer.merges) == 48894
    assert tokenizer.merges[0] == ("i", "n") and tokenizer.vocab["in"] == 512
    assert tokenizer.vocab["!"] == 0 and tokenizer.vocab["!</w>"] == 256
    save_hf_tokenizer(tokenizer, tmp_path)
    assert (
        (tmp_path / "merges.txt")
        .read_text(encoding="utf-8")
        .startswith("#version: 0.2\ni n\nt h\n")
    )
    loaded = CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert loaded.vocab == tokenizer.vocab and loaded.merges == tokenizer.merges
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    # SD1.5 pads with eos (OpenAI clip.tokenize pads with 0)
    assert special["pad_token"] == "<|endoftext|>"


def test_tokenizer_bad_input(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="vocab.json.*<\\|startoftext\\|>"):
        CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(ValueError, match="'hf' or 'openai'"):
        clean_text("x", "ftfy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default mode never warns
        CLIPTokenizer.default()


if __name__ == "__main__":
    main()
