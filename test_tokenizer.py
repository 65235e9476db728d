"""Tests for tokenizer.py on the real CLIP vocabulary (assets/bpe_simple_vocab_16e6.txt.gz).

References: the ids OpenAI's SimpleTokenizer gives for 322 strings, committed in assets/tokenizer_golden.json
by assets/make_tokenizer_golden.py (so no extra install), and transformers' CLIPTokenizer reading the files
our save_hf_files wrote. Deviations: none.
"""

import json
import re
import sys
import unicodedata
import warnings

import pytest
import torch

from assets.make_tokenizer_golden import golden_strings, is_plain
from conftest import hf_clip_tokenizer, tokenizer_golden
from tokenizer import CLIPTokenizer, clean_text, pretokenizer


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
    assert tokenizer.encode("an astronaut riding a horse on mars") == [550, 18376, 6765, 320, 4558, 525, 7496]
    assert tokenizer.encode("don't") == [847, 713] and tokenizer.encode("1234") == [272, 273, 274, 275]
    ids = tokenizer(["a photo of a cat", ""])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and (ids[0, 7:] == 49407).all()
    assert ids[1].tolist() == [49406] + [49407] * 76  # the unconditional (CFG) prompt
    long = tokenizer(["cat " * 100])[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long[1:-1] == 2368).all()  # truncated, eos kept last


def test_tokenizer_matches_transformers(golden, hf_reference):
    """Default ("hf") cleaning: identical ids to transformers' CLIPTokenizer (what SD1.5 pipelines use)."""
    strings = list(golden)
    ours = CLIPTokenizer.default()(strings)
    expected = hf_reference(strings, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt")
    mismatches = [s for s, a, b in zip(strings, ours, expected.input_ids) if not torch.equal(a, b)]
    assert mismatches == []


def test_tokenizer_json_written_by_transformers_loads(golden, hf_reference, tmp_path):
    """transformers >= 5 save_pretrained writes only tokenizer.json: the same vocabulary and merges."""
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
    """Without ftfy, "openai" cleaning warns and still matches OpenAI wherever ftfy would only apply NFC."""
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
    """Our stdlib-`re` split equals OpenAI's `regex` pattern for every code point assigned in this Python's
    Unicode version (newer code points can differ: deviation 2 in tokenizer.py)."""
    import regex

    reference = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                              r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    assigned = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    text = " ".join(f"a{c}!{c}" for c in assigned)  # tells letter / number / other / dropped apart
    assert pretokenizer("openai").findall(text) == reference.findall(text)


def test_vocabulary_files_round_trip(tmp_path):
    tokenizer = CLIPTokenizer.default()
    assert len(tokenizer.vocab) == 49408 and len(tokenizer.merges) == 48894
    assert tokenizer.merges[0] == ("i", "n") and tokenizer.vocab["in"] == 512
    assert tokenizer.vocab["!"] == 0 and tokenizer.vocab["!</w>"] == 256
    tokenizer.save_hf_files(tmp_path)
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\ni n\nt h\n")
    loaded = CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert loaded.vocab == tokenizer.vocab and loaded.merges == tokenizer.merges
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special["pad_token"] == "<|endoftext|>"  # SD1.5 pads with eos (OpenAI clip.tokenize pads with 0)


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
