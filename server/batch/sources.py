"""What `blipserve batch` reads: the input, recognised by what it is, as shards of rows.

- a folder of images (searched recursively; key = the path relative to the folder), cut into shards of
  `shard_size` files in sorted order;
- webdataset tar shards, as img2dataset writes them: a `.tar` file, a folder of them, or a brace pattern
  (`shards/{00000..00099}.tar`); a sample is the members sharing a key (`KEY.jpg|png|webp` + `KEY.json` /
  `KEY.txt`); read with the standard library's tarfile;
- parquet files (a file or a folder of them) with an image-bytes column (img2dataset's `jpg`, or a
  Hugging Face image struct `{bytes, path}`) or a path / URL column;
- an OpenAI batch JSONL file: `{"custom_id", "method", "url", "body"}` per line.

Hidden files and folders (a name starting with "."; macOS's `._photo.jpg` companions among them) are
not input. A row is identified by its shard and its index in it (`Row.index`); its key is what the
output names. A shard file that cannot be read (truncated, corrupt) is a `ShardError`: that shard fails,
the others go on.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.client import IMAGE_SUFFIXES
from server.inputs import is_url

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "image_bytes", "img")
OPENAI_URLS = ("/v1/chat/completions", "/caption", "/vqa")
BATCH_REFUSED = ("stream", "stream_options")  # body fields a batch line cannot have (replies are JSON)


class InputError(ValueError):
    """The input cannot be read as any of the supported kinds (the message says why)."""


class ShardError(Exception):
    """One shard file cannot be read (truncated, corrupt, unreadable, or changed since the last run):
    that shard is left unfinished (a rerun tries it again) and the job goes on with the others."""


# What reading a damaged tar, parquet or JSONL file raises (pyarrow's: OSError, ValueError such as
# ArrowInvalid, NotImplementedError for an encoding it does not read).
_READ_ERRORS = (OSError, EOFError, ValueError, NotImplementedError, tarfile.TarError)


@dataclass
class Row:
    """One unit of work: an image (bytes, a file or an http(s) URL) with its question, or an OpenAI
    batch request line; `error` when the input row itself is unusable (it is answered with it)."""

    index: int
    key: str
    image: bytes | Path | str | None = None
    question: str | None = None
    request: dict[str, Any] | None = None  # an OpenAI batch line ({} when it is not one)
    error: str | None = None


@dataclass
class Columns:
    """Which parquet columns / webdataset JSON fields hold what (None: found by name)."""

    image: str | None = None
    key: str | None = None
    question: str | None = None


@dataclass
class Shard:
    """One input shard and its output name. `kind`: images | tar | parquet | openai."""

    name: str
    kind: str
    path: Path  # the tar / parquet / JSONL file, or the image folder
    files: list[Path] = field(default_factory=list)  # kind images: this shard's files

    def count(self, columns: Columns | None = None) -> int:
        """Rows in the shard (reads only headers / metadata). InputError when a parquet file lacks
        the columns asked for (`columns`); ShardError when the file cannot be read."""
        if self.kind == "images":
            return len(self.files)
        try:
            if self.kind == "tar":
                return len(_tar_samples(self.path))
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(self.path)
                parquet_columns(pf.schema_arrow.names, columns or Columns(), self.path)
                return pf.metadata.num_rows
            with self.path.open("rb") as f:
                return sum(1 for line in f if line.strip())
        except InputError:
            raise
        except _READ_ERRORS as exc:
            raise ShardError(f"{self.path}: cannot be read: {_reason(exc)}") from None

    def rows(self, columns: Columns, done: dict[int, str] | None = None) -> Iterator[Row]:
        """The rows not in `done` (index -> key of a row already answered), in order. ShardError when
        the file cannot be read on, or a done row's key is not the one at its index now (the input
        changed since the last run)."""
        done = done or {}
        readers = {"images": _image_rows, "tar": _tar_rows, "parquet": _parquet_rows, "openai": _openai_rows}
        index = -1
        try:
            for row in readers[self.kind](self, columns, done):
                index = row.index
                expected = done.get(row.index)
                if expected is None:
                    yield row
                elif expected != row.key:
                    raise ShardError(
                        f"{self.path}: row {row.index} is {row.key!r} now, {expected!r} in the last run: "
                        "the input changed (start again with an empty --output)"
                    )
        except (ShardError, InputError):
            raise
        except _READ_ERRORS as exc:
            raise ShardError(f"{self.path}: cannot be read after row {index}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """One line (tarfile's errors span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, OSError) else f"{type(exc).__name__}: {text}"


def check_columns(shards: list[Shard], columns: Columns) -> None:
    """InputError when a column option does not apply to the input's kind (parquet columns for image
    folders, ...); parquet files are checked for the named columns by `Shard.count`."""
    kinds = {s.kind for s in shards}
    if (columns.image or columns.key) and kinds != {"parquet"}:
        raise InputError("--image-column and --key-column are for parquet input (this input is not)")
    if columns.question and not kinds <= {"parquet", "tar"}:
        raise InputError("--question-column is for parquet or webdataset input (this input is neither)")


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar a/001.tar a/002.tar (zero padding kept); `{x,y}` lists too."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def find_shards(source: str | list[str], shard_size: int = 10_000) -> list[Shard]:
    """The shards of `source` (see the module docstring), or of several files (each a shard: what the
    shell makes of `shards/*.tar` or an unquoted brace pattern); InputError if it is none of the kinds."""
    if isinstance(source, list):
        missing = [p for p in source if not Path(p).is_file()]
        if missing:
            raise InputError(
                f"{missing[0]}: no such file (several inputs must each be a .tar, .parquet or .jsonl)"
            )
        return _named([_file_shard(Path(p)) for p in source])
    if "{" in source:
        paths = [Path(p) for p in expand_braces(source)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise InputError(f"{len(missing)} shards of the pattern do not exist, e.g. {missing[0]}")
        return _named([_file_shard(p) for p in paths])
    path = Path(source)
    if path.is_file():
        return [_file_shard(path)]
    if not path.is_dir():
        raise InputError(f"{source}: no such file or folder")
    for suffixes in ((".tar",), (".parquet",)):
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes) and not _hidden(p.name)
        )
        if files:
            return _named([_file_shard(p) for p in files])
    images = sorted(
        p
        for p in path.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(_hidden(part) for part in p.relative_to(path).parts)
        and p.is_file()
    )
    if not images:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise InputError(f"{source}: no images ({suffixes}), .tar or .parquet files in this folder")
    chunks = [images[i : i + shard_size] for i in range(0, len(images), shard_size)]
    return [Shard(f"images-{i:05d}", "images", path, chunk) for i, chunk in enumerate(chunks)]


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _file_shard(path: Path) -> Shard:
    name = path.name
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return Shard(re.sub(r"\.(tar|tar\.gz|tgz)$", "", name), "tar", path)
    if name.endswith(".parquet"):
        return Shard(path.stem, "parquet", path)
    if name.endswith((".jsonl", ".json")):
        return Shard(path.stem, "openai", path)
    raise InputError(f"{path}: not a .tar, .parquet or OpenAI batch .jsonl file")


def _named(shards: list[Shard]) -> list[Shard]:
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise InputError("two input shards have the same file name: their outputs would collide")
    return shards


def _image_rows(shard: Shard, columns: Columns, done: dict[int, str]) -> Iterator[Row]:
    for i, path in enumerate(shard.files):
        yield Row(i, path.relative_to(shard.path).as_posix(), path)


def _tar_samples(path: Path) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, extension -> member) per sample, in the order of their first member (webdataset's rule:
    the key is the path up to the first dot of the file name)."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot or base.startswith("."):
                continue
            key = f"{folder}/{stem}" if folder else stem
            samples.setdefault(key, {})[ext.lower()] = member
    return list(samples.items())


def _tar_rows(shard: Shard, columns: Columns, done: dict[int, str]) -> Iterator[Row]:
    samples = _tar_samples(shard.path)
    with tarfile.open(shard.path) as tf:
        for i, (key, members) in enumerate(samples):
            if i in done:
                yield Row(i, key)  # only its key is checked
                continue
            image = next((members[e] for e in WDS_IMAGE_EXTS if e in members), None)
            row = Row(i, key)
            try:
                if image is None:
                    row.error = f"sample {key!r} has no image ({'|'.join(WDS_IMAGE_EXTS)})"
                else:
                    row.image = tf.extractfile(image).read()
                if columns.question and "json" in members:
                    meta = json.loads(tf.extractfile(members["json"]).read())
                    row.question = _text_or_none(meta.get(columns.question))
            except (OSError, tarfile.TarError, json.JSONDecodeError, AttributeError) as exc:
                row.error = f"sample {key!r} could not be read: {exc}"
            yield row


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _parquet_rows(shard: Shard, columns: Columns, done: dict[int, str]) -> Iterator[Row]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard.path)
    image_col, key_col = parquet_columns(pf.schema_arrow.names, columns, shard.path)
    wanted = [c for c in dict.fromkeys([image_col, key_col, columns.question]) if c]
    index = 0
    for batch in pf.iter_batches(batch_size=256, columns=wanted):
        data = batch.to_pydict()
        for j in range(batch.num_rows):
            key = str(data[key_col][j]) if key_col else str(index)
            if index in done:
                yield Row(index, key)
            else:
                row = Row(
                    index,
                    key,
                    question=_text_or_none(data[columns.question][j]) if columns.question else None,
                )
                row.image, row.error = _parquet_image(data[image_col][j], shard.path.parent)
                yield row
            index += 1


def parquet_columns(names: list[str], columns: Columns, path: Path) -> tuple[str, str | None]:
    """(image column, key column or None) of a parquet file with columns `names`; InputError naming the
    option when a column asked for, or any image column, is not there."""
    for option, name in (("--image-column", columns.image), ("--key-column", columns.key),
                         ("--question-column", columns.question)):  # fmt: skip
        if name is not None and name not in names:
            raise InputError(f"{path}: {option} {name!r}: no such column (columns: {', '.join(names)})")
    image_col = columns.image or next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
    if image_col is None:
        raise InputError(
            f"{path}: no image column ({', '.join(PARQUET_IMAGE_COLUMNS)}): name it with --image-column "
            f"(columns: {', '.join(names)})"
        )
    return image_col, columns.key or ("key" if "key" in names else None)


def _parquet_image(value: Any, folder: Path) -> tuple[bytes | Path | str | None, str | None]:
    """A cell -> (image, error): bytes, a Hugging Face image struct, a URL or a path (relative to the
    parquet file's folder)."""
    if isinstance(value, dict):  # datasets' Image feature: {"bytes", "path"}
        value = value.get("bytes") or value.get("path")
    if value is None or value == b"" or value == "":
        return None, "no image in this row"
    if isinstance(value, bytes):
        return value, None
    if isinstance(value, str):
        return (value if is_url(value) else folder / value), None
    return None, f"image column holds {type(value).__name__}, not bytes, a path or a URL"


def _openai_rows(shard: Shard, columns: Columns, done: dict[int, str]) -> Iterator[Row]:
    seen: set[str] = set()
    with shard.path.open("rb") as f:
        # Rows count the non-blank lines (the journal's index); errors name the file's own line number.
        lines = ((number, line) for number, line in enumerate(f, start=1) if line.strip())
        for i, (number, line) in enumerate(lines):
            row = _openai_row(i, number, line)
            if row.key in seen and row.error is None:
                row.error = f"custom_id {row.key!r} is not unique in the file"
            seen.add(row.key)
            yield Row(i, row.key) if i in done else row


def _openai_row(index: int, number: int, line: bytes) -> Row:
    """Row `index` of the batch file, on its line `number` (1-based, blank lines counted); an unusable
    one becomes a row with `error` (its key: line-N)."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return Row(index, f"line-{number}", request={}, error=f"line {number}: not valid JSON")
    if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
        error = f"line {number}: custom_id (a string) is required"
        return Row(index, f"line-{number}", request={}, error=error)
    row = Row(index, obj["custom_id"], request=obj)
    if str(obj.get("method", "POST")).upper() != "POST":
        row.error = "method: only POST is supported"
    elif obj.get("url") not in OPENAI_URLS:
        row.error = f"url: must be one of {', '.join(OPENAI_URLS)}"
    elif not isinstance(obj.get("body"), dict):
        row.error = "body: a JSON object is required"
    else:
        row.error = unbatchable(obj["body"])
    return row


def unbatchable(body: dict[str, Any]) -> str | None:
    """Why a request body asks for something a batch job cannot give (each line gets one JSON reply,
    as OpenAI's Batch API, which refuses streaming too), naming the field; None when it can be answered."""
    for name in BATCH_REFUSED:
        if body.get(name) not in (None, False):
            return f"body.{name}: not supported in a batch job (each line gets one JSON reply, not a stream)"
    return None
