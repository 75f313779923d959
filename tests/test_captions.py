"""Image-text (captioned) shards: the Sample.txt member, the embedded emoji caption sets, the writer's caption
sources (image + .txt folders, CSV / parquet tables, img2dataset's tars read as they are) and inspect's statistics."""
from __future__ import annotations

import importlib.util
import io
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import webdataset as wds

from data_pipeline import embedded
from data_pipeline import inspect as inspect_cli
from data_pipeline import write as write_cli
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
    # the seen-glyph set: training captions, images that are in no training shard
    seen = embedded.source("emoji_captions_seen_val")
    assert seen.total == embedded.EMOJI_CAPTION_SEEN and set(seen.metadata["codepoints"]) <= set(train.metadata["codepoints"])
    by_caption = {caption: ch for ch, (caption, _) in glyphs.items()}

    def training_images(ch: str) -> list[bytes]:
        return [embedded.encode_image(embedded.render_caption_image(glyphs[ch][1], np.random.default_rng(
            [0, ord(ch), v, 0])), "jpg", quality=95)[0] for v in range(embedded.EMOJI_CAPTION_VARIANTS)]

    assert first[0].image in training_images(by_caption[first[0].txt])  # how training images are made
    for s in [s for _, s in zip(range(3), seen.samples)]:
        ch = by_caption[s.txt]
        assert seen.metadata["classes"][s.cls] == s.txt and not embedded.is_held_out(ch)
        trained = training_images(ch)
        assert s.image not in trained and len(set(trained)) == len(trained)
    names = {unicodedata.name(ch).lower() for ch in glyphs}
    assert all(s.txt in names or any(s.txt == n.removeprefix(w) for n in names for w in ("black ", "white "))
               for s in first)


def test_fashion_prompts_name_every_class():
    assert len(embedded.FASHION_PROMPTS) == len(embedded.FASHION_CLASSES)
    for name, prompts in zip(embedded.FASHION_CLASSES, embedded.FASHION_PROMPTS):
        assert prompts[0] == name.lower() and len(set(prompts)) == len(prompts)


# ----------------------------------------------------------------------------------------------- external sources


def _write(argv: list[str], capsys) -> tuple[int, str, str]:
    status = write_cli.main([*argv, "--quiet"])
    out = capsys.readouterr()
    return status, out.out, out.err


def _pairs_folder(root: Path) -> dict[str, str]:
    """Image + caption pairs (one in a sub-folder, a BOM'd caption), and the bad records write must skip."""
    expected = {}
    for i, caption in enumerate(["a red bicycle", "Zwei Hunde, im Schnee", "café au lait"]):
        folder = root / ("sub" if i == 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i}.png").write_bytes(_png(i))
        (folder / f"img{i}.txt").write_bytes((("\ufeff" if i == 1 else "") + caption + "\n").encode())
        expected[caption] = f"img{i}"
    (root / "lonely.png").write_bytes(_png(7))              # no caption file
    (root / "orphan.txt").write_text("a caption without an image")
    (root / "blank.png").write_bytes(_png(8))
    (root / "blank.txt").write_text("  \n")                 # empty caption
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "broken.txt").write_text("a broken image")
    return expected


def test_folder_of_pairs_and_tables_read_back(tmp_path, capsys):
    expected = _pairs_folder(tmp_path / "pairs")
    status, out, _ = _write([str(tmp_path / "pairs"), str(tmp_path / "out1")], capsys)
    assert status == 0 and "captions: 3 (3 unique)" in out
    rows, stream = read_all(str(tmp_path / "out1"))
    assert sorted(r["txt"] for r in rows) == sorted(expected) and not stream.skipped
    meta = stream.index.metadata
    assert meta["kind"] == "captioned" and meta["captions"]["count"] == 3
    reasons = {Path(p).name for p in meta["skipped"]["paths"]}
    assert reasons == {"lonely.png", "orphan.txt", "blank.txt", "broken.jpg"}

    # a CSV of (filepath, title) rows, paths relative to the CSV, a quoted comma, a missing file, an empty caption
    images = tmp_path / "table" / "images"
    images.mkdir(parents=True)
    for i in range(3):
        (images / f"{i}.png").write_bytes(_png(10 + i))
    table = tmp_path / "table" / "captions.csv"
    table.write_text('filepath,title,extra\nimages/0.png,"one, with a comma",x\nimages/1.png,two; with; semicolons,y\n'
                     f'{images / "2.png"},three (absolute path),z\nimages/missing.png,gone,w\nimages/0.png,,v\n')
    status, out, _ = _write([str(table), str(tmp_path / "out2")], capsys)
    assert status == 0 and "skipped 2" in out
    rows, stream = read_all(str(tmp_path / "out2"))
    assert sorted(r["txt"] for r in rows) == ["one, with a comma", "three (absolute path)", "two; with; semicolons"]
    assert sorted(stream.index.metadata["skipped"]["paths"]) == [
        f"captions.csv row 5 ({images / 'missing.png'})", "captions.csv row 6 (images/0.png)"]

    # a TSV with its own column names, images under --images
    tsv = tmp_path / "other.tsv"
    tsv.write_text("img_name\tsentence\n0.png\tfirst\n1.png\tsecond\n")
    status, _, err = _write([str(tsv), str(tmp_path / "out3"), "--images", str(images)], capsys)
    assert status == 2 and "no image path column" in err and "'img_name', 'sentence'" in err
    status, _, _ = _write([str(tsv), str(tmp_path / "out3"), "--images", str(images), "--path-column", "img_name",
                           "--caption-column", "sentence"], capsys)
    assert status == 0 and sorted(r["txt"] for r in read_all(str(tmp_path / "out3"))[0]) == ["first", "second"]


def test_bad_caption_inputs_exit_2_in_one_paragraph(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(_png(1))
    cases = {
        "nocaption.csv": ("filepath,label\na.png,3\n", "no caption column"),
        "urls.csv": ("url,caption\nhttps://example.com/a.jpg,a cat\n", "img2dataset --url_list"),
        "urls2.csv": ("image,caption\nhttps://example.com/a.jpg,a cat\n", "holds URLs"),
        "empty.csv": ("", "is empty"),
        "header.csv": ("filepath,caption\n", "no rows"),
        "latin1.csv": (b"filepath,caption\na.png,caf\xe9\n", "not UTF-8"),
        "wrongcol.csv": ("filepath,caption\na.png,x\n", "no column 'nope' (--caption-column)"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        extra = ["--caption-column", "nope"] if name == "wrongcol.csv" else []
        status, _, err = _write([str(path), str(tmp_path / "out"), *extra], capsys)
        assert status == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, (name, err)
    parquet = tmp_path / "rows.parquet"
    parquet.write_bytes(b"PAR1 not really")
    status, _, err = _write([str(parquet), str(tmp_path / "out")], capsys)
    assert status == 2 and ("pip install pyarrow" in err or "Cannot read the parquet table" in err)
    status, _, err = _write([str(tmp_path / "a.png"), str(tmp_path / "out")], capsys)
    assert status == 2 and "caption table" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="parquet tables need pyarrow (not installed)")
def test_parquet_table(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
    pq.write_table(pa.table({"image_path": ["0.png", "1.png"], "text": ["zero", "one"]}), tmp_path / "t.parquet")
    status, _, _ = _write([str(tmp_path / "t.parquet"), str(tmp_path / "out")], capsys)
    assert status == 0 and sorted(r["txt"] for r in read_all(str(tmp_path / "out"))[0]) == ["one", "zero"]


def _img2dataset_folder(root: Path) -> dict[str, str]:
    """img2dataset's --output_format webdataset layout: NNNNN.tar (jpg + txt + json per sample), NNNNN_stats.json and
    NNNNN.parquet beside each; one sample lost its caption."""
    root.mkdir()
    expected = {}
    for shard in range(2):
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as tar:
            for i in range(3):
                key = f"{shard:05d}{i:04d}"
                caption = f"photo {shard}-{i} of a lighthouse"
                buf = io.BytesIO()
                Image.new("RGB", (20, 16), (shard * 90, i * 60, 30)).save(buf, format="JPEG")
                sample = {"__key__": key, "jpg": buf.getvalue(),
                          "json": {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                                   "caption": caption, "width": 20, "height": 16, "error_message": None}}
                if (shard, i) != (1, 2):
                    sample["txt"] = caption
                    expected[key] = caption
                tar.write(sample)
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 4, "successes": 3,
                                                                  "failed_to_download": 1}))
        (root / f"{shard:05d}.parquet").write_bytes(b"PAR1")  # img2dataset's per-shard table: never read
    return expected


def test_img2dataset_shards_read_as_they_are(tmp_path, capsys):
    folder = tmp_path / "laion"
    expected = _img2dataset_folder(folder)
    # without an index: the stream counts the tars and reads them; the json member is accepted, not detection
    rows, stream = read_all(str(folder))
    assert {r["key"]: r["txt"] for r in rows} == expected and stream.skipped == {"missing_txt": 1}

    status, out, _ = _write([str(folder), "--index-only"], capsys)
    assert status == 0 and "indexed 6 samples in 2 shards" in out and "captions: 5 (5 unique)" in out
    index = json.loads((folder / "index.json").read_text())
    assert [s["url"] for s in index["shards"]] == ["00000.tar", "00001.tar"]
    assert [s["samples"] for s in index["shards"]] == [3, 3]
    meta = index["metadata"]
    assert meta["kind"] == "captioned" and meta["img2dataset"] == {"count": 8, "successes": 6, "failed_to_download": 2}
    assert meta["skipped"]["count"] == 1 and "missing_txt" in meta["skipped"]["paths"][0]
    rows, stream = read_all(str(folder))
    assert not stream.index.counted and {r["key"]: r["txt"] for r in rows} == expected
    assert sorted(p.name for p in folder.iterdir())[:2] == ["00000.parquet", "00000.tar"]  # nothing rewritten

    status = inspect_cli.main([str(folder), "--verify", "--require", "image,txt", "--workers", "1"])
    out = capsys.readouterr().out
    assert status == 1  # the sample without its caption is a bad sample
    assert "captions  5 (5 unique); characters 25-25, mean 25.0; words 5-5" in out and "captions read: 5 (5 unique)" in out
    assert "missing_txt" in out

    # or re-written as this project's shards (here downscaled)
    status, out, _ = _write([str(folder), str(tmp_path / "rewritten"), "--resize", "8"], capsys)
    assert status == 0 and "wrote 5 samples" in out and "skipped 1" in out
    rows, _ = read_all(str(tmp_path / "rewritten"))
    assert sorted(r["txt"] for r in rows) == sorted(expected.values()) and {r["size"] for r in rows} == {10}


def test_index_only_on_an_fsspec_url(tmp_path, capsys):
    import fsspec

    expected = _img2dataset_folder(tmp_path / "local")
    fs = fsspec.filesystem("memory")
    for p in (tmp_path / "local").iterdir():
        fs.pipe(f"/remote-laion/{p.name}", p.read_bytes())
    try:
        status, out, _ = _write(["memory://remote-laion", "--index-only"], capsys)
        assert status == 0 and "indexed 6 samples in 2 shards" in out
        rows, stream = read_all("memory://remote-laion")
        assert not stream.index.counted and {r["key"]: r["txt"] for r in rows} == expected
    finally:
        fs.rm("/remote-laion", recursive=True)


def test_index_only_bad_inputs(tmp_path, capsys):
    status, _, err = _write([str(tmp_path), "--index-only"], capsys)
    assert status == 2 and "no .tar shards" in err
    with wds.TarWriter(str(tmp_path / "00000.tar")) as tar:
        tar.write({"__key__": "0", "png": _png(1), "cls": 3})
    status, _, err = _write([str(tmp_path), "--index-only"], capsys)
    assert status == 2 and "has a caption" in err and not (tmp_path / "index.json").exists()
    status, _, err = _write([str(tmp_path), str(tmp_path / "out")], capsys)  # re-writing them: the same answer
    assert status == 2 and "has a caption" in err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        write_cli.main([str(tmp_path), str(tmp_path / "out"), "--index-only"])
    assert exit_info.value.code == 2 and "drop OUT_URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        write_cli.main([str(tmp_path)])
    assert exit_info.value.code == 2 and "OUT_URL is required" in capsys.readouterr().err
