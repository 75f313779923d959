"""Image-text (captioned) shards: the Sample.txt member, the embedded emoji caption sets, the writer's caption
sources (image + .txt folders, CSV / parquet tables, img2dataset's tars read as they are) and inspect's statistics."""
from __future__ import annotations

import io
import json
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline import embedded
from data_pipeline.shard_writer import CaptionStats, Sample, sample_members, write_shards
from data_pipeline.stream import build_stream

needs_font = pytest.mark.skipif(not embedded.EMOJI_FONT.exists(),
                                reason=f"{embedded.EMOJI_FONT} is absent: apt-get install fonts-noto-color-emoji")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _caption_fields(sample: dict) -> dict:
    return {"txt": sample["txt"], "cls": sample.get("cls", -1), "key": sample["__key__"], "size": sample["image"].size[0]}


def read_all(url: str, required: tuple[str, ...] = ("image", "txt")) -> tuple[list[dict], object]:
    """Every sample of a set once (evaluation order, padding dropped) through the stream jobs use."""
    stream = build_stream(url, map_fn=_caption_fields, batch_size=8, num_workers=0, train=False, required=required)
    rows = []
    for batch in stream:
        for i, pad in enumerate(batch["is_padding"].tolist()):
            if not pad:
                rows.append({k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()
                             if k != "is_padding"})
    return rows, stream


def _png(value: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, 40, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_txt_member_and_caption_statistics(tmp_path):
    assert sample_members(Sample(b"x", "png", txt="a red fox"))["txt"] == b"a red fox"
    assert "txt" not in sample_members(Sample(b"x", "png", cls=3))
    captions = ["a red fox", "two   dogs on grass", "a red fox", "ø"]
    samples = [Sample(_png(i), "png", txt=c) for i, c in enumerate(captions)]
    result = write_shards(samples, str(tmp_path / "out"), {"kind": "captioned", "source": "test"}, maxcount=1,
                          progress=False)
    stats = result.index["metadata"]["captions"]
    assert stats == {"count": 4, "unique": 3, "chars": {"min": 1, "mean": round((9 + 19 + 9 + 1) / 4, 2), "max": 19},
                     "words": {"min": 1, "mean": round((3 + 4 + 3 + 1) / 4, 2), "max": 4}}
    rows, stream = read_all(str(tmp_path / "out"))
    assert sorted(r["txt"] for r in rows) == sorted(captions) and not stream.skipped  # UTF-8 round trip
    empty = CaptionStats().summary()
    assert empty["count"] == 0 and empty["chars"]["mean"] == 0


@needs_font
def test_emoji_caption_sets_split_and_read_back(cache):
    glyphs = embedded.caption_glyphs()
    held_out = {ch for ch in glyphs if embedded.is_held_out(ch)}
    assert len(glyphs) > 1000 and 0.05 < len(held_out) / len(glyphs) < 0.15
    captions = [caption for caption, _ in glyphs.values()]
    assert len(set(captions)) == len(captions)  # one caption per glyph: retrieval has one right answer
    assert glyphs["\U0001F428"][0] == "koala" and glyphs["\u263A"][0] == "smiling face"  # WHITE SMILING FACE

    rows, stream = read_all("embedded:emoji_captions_val")
    index_meta = stream.index.metadata
    assert index_meta["kind"] == "captioned" and len(rows) == len(held_out) == index_meta["glyphs"]
    val_captions = {glyphs[ch][0] for ch in held_out}
    assert {r["txt"] for r in rows} == val_captions and index_meta["captions"]["unique"] == len(val_captions)
    assert all(index_meta["classes"][r["cls"]] == r["txt"] for r in rows)  # zero-shot labels name the caption
    assert {r["size"] for r in rows} == {embedded.EMOJI_CAPTION_SIZE}
    assert {f"U+{ord(ch):04X}" for ch in held_out} == set(index_meta["codepoints"])

    # the training split: every other glyph, several images each, deterministic, none held out
    train = embedded.source("emoji_captions")
    assert train.total == (len(glyphs) - len(held_out)) * embedded.EMOJI_CAPTION_VARIANTS
    assert not set(train.metadata["codepoints"]) & set(index_meta["codepoints"])
    first = [s for _, s in zip(range(12), train.samples)]
    again = [s for _, s in zip(range(12), embedded.source("emoji_captions").samples)]
    assert [(s.txt, s.image) for s in first] == [(s.txt, s.image) for s in again]
    assert not {s.txt for s in first} & val_captions and all(s.cls is None for s in first)
    names = {unicodedata.name(ch).lower() for ch in glyphs}
    assert all(s.txt in names or any(s.txt == n.removeprefix(w) for n in names for w in ("black ", "white "))
               for s in first)


def test_fashion_prompts_name_every_class():
    assert len(embedded.FASHION_PROMPTS) == len(embedded.FASHION_CLASSES)
    for name, prompts in zip(embedded.FASHION_CLASSES, embedded.FASHION_PROMPTS):
        assert prompts[0] == name.lower() and len(set(prompts)) == len(prompts)
