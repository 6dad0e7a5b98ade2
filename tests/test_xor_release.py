"""XOR releases (OpenAssistant's xor_codec format): `wb diff --format xor` and `wb recover` on them.

The oracle is the format itself, written out here: a payload is the TUNED file XOR RAW's file of
the same name over TUNED's length (RAW zero-padded or truncated), gzipped or not, and the lists are
plain md5sum lines. Every round trip is compared byte for byte with TUNED.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from clicheck import assert_one_error
from click.testing import CliRunner
from hostile import PATH_STRINGS, Sandbox, blobs, flipped, hostile_json_file, run_wb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import as_hub_cache, make_model, perturbed, save_layout, state_dict_for_files

from workbench.cli import wb
from workbench.weights import xor_release
from workbench.weights.xor_release import is_xor_release, make_xor_release

HAND_MADE = {  # name: (RAW's bytes or None, TUNED's bytes), sizes chosen around the 4-byte test chunks
    "pad.dat": (b"\x01\x02\x03", bytes(range(40, 49))),  # RAW shorter: zero-padded
    "cut.dat": (bytes(range(200, 210)), b"\xff\xfe\xfd\xfc"),  # RAW longer: truncated
    "same.dat": (b"same bytes!", b"same bytes!"),
    "grown.dat": (b"", b"12345"),  # RAW empty
    "empty.dat": (b"", b""),
    "gone.dat": (b"abcdefgh", b""),  # TUNED empty, RAW's bytes still hashed whole
    "notes.gz": (None, b"plain text in a file named .gz\n"),  # no base: stored as it is; not gzip by its bytes
    "boundary.dat": (bytes(range(8)), bytes(range(100, 112))),  # ends on chunk boundaries
}


def reference_xor(tuned: bytes, base: bytes | None) -> bytes:
    """The format's rule: tuned XOR base over tuned's length, base zero-padded or truncated."""
    padded = (base or b"")[: len(tuned)].ljust(len(tuned), b"\0")
    return bytes(a ^ b for a, b in zip(tuned, padded))


def run(*args, cwd: Path | None = None):
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return CliRunner().invoke(wb, [str(a) for a in args])
    finally:
        os.chdir(old)


def files_of(folder: Path, skip: tuple[str, ...] = ("recover.json",)) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name not in skip}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_hand_made(root: Path) -> tuple[Path, Path]:
    raw, tuned = root / "raw", root / "tuned"
    raw.mkdir(parents=True)
    tuned.mkdir()
    for name, (base, new) in HAND_MADE.items():
        if base is not None:
            (raw / name).write_bytes(base)
        (tuned / name).write_bytes(new)
    return raw, tuned


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_tokenizer):
    """layout -> (RAW, TUNED): a tiny Llama and a fine-tuned copy in the same file layout, TUNED with an
    added_tokens.json and a longer config.json (padding at a file end)."""
    root = tmp_path_factory.mktemp("xor-pairs")
    model = make_model(len(tiny_tokenizer), hidden=32, intermediate=64)
    state = state_dict_for_files(model)
    made = {}
    for layout in ("safetensors-sharded", "bin"):
        raw = save_layout(state, root / layout / "raw", layout, config=model.config, tokenizer=tiny_tokenizer)
        tuned = save_layout(perturbed(state), root / layout / "tuned", layout, config=model.config,
                            tokenizer=tiny_tokenizer)
        (tuned / "added_tokens.json").write_text('{"<|assistant|>": 320}\n')
        config = json.loads((tuned / "config.json").read_text())
        (tuned / "config.json").write_text(json.dumps({**config, "note": "fine-tuned " * 20}, indent=2))
        made[layout] = (raw, tuned)
    return made


@pytest.fixture(scope="module")
def release(pairs, tmp_path_factory):
    """A plain XOR release of the sharded pair, made through the CLI."""
    raw, tuned = pairs["safetensors-sharded"]
    out = tmp_path_factory.mktemp("xor-release") / "rel"
    result = run("diff", "--format", "xor", "--base", raw, "--tuned", tuned, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.skipif(shutil.which("md5sum") is None, reason="coreutils md5sum is not installed")
def test_the_lists_are_what_md5sum_checks(pairs, release):
    """The peer for the lists is coreutils: `md5sum -c base.md5` passes inside RAW and
    `md5sum -c result.md5` inside TUNED, file for file."""
    import subprocess

    raw, tuned = pairs["safetensors-sharded"]
    for folder, listed in ((raw, "base.md5"), (tuned, "result.md5")):
        checked = subprocess.run(["md5sum", "-c", "--strict", str(release / listed)], cwd=folder,
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        lines = [line for line in checked.stdout.splitlines() if line.endswith(": OK")]
        assert len(lines) == len((release / listed).read_text().splitlines())


# -- round trips ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin"])
def test_round_trip_through_the_cli(pairs, tmp_path, layout):
    raw, tuned = pairs[layout]
    rel = tmp_path / "rel"
    made = run("diff", "--format", "xor", "--base", raw, "--tuned", tuned, "--out", rel)
    assert made.exit_code == 0, made.output
    assert "note: stored as they are (RAW has no file of that name): added_tokens.json" in made.stderr
    assert "bytes lie beyond RAW's file" in made.stderr  # the longer config.json
    meta = json.loads((rel / "weight_diff.json").read_text())
    assert meta["format"] == "xor" and meta["lists"] == {"base": "base.md5", "result": "result.md5"}
    tuned_files, raw_files = files_of(tuned), files_of(raw)
    for name, data in tuned_files.items():  # every payload is the reference XOR, named as TUNED's file
        assert (rel / name).read_bytes() == reference_xor(data, raw_files.get(name)), name
        assert meta["files"][name]["size"] == len(data)
    assert (rel / "result.md5").read_text() == "".join(f"{md5(d)}  {n}\n" for n, d in tuned_files.items())
    assert (rel / "base.md5").read_text() == "".join(f"{md5(raw_files[n])}  {n}\n" for n in tuned_files if n in raw_files)
    assert is_xor_release(rel)

    out = tmp_path / "out"
    recovered = run("recover", "--base", raw, "--diff", rel, "--out", out)  # detected as an XOR release
    assert recovered.exit_code == 0, recovered.output
    assert "files: byte-identical to TUNED's" in recovered.stdout
    assert files_of(out) == tuned_files
    record = json.loads((out / "recover.json").read_text())
    assert record["source"] == "xor release" and record["output"]["byte_identical"] is True
    assert record["inputs"]["diff"]["weight_diff_sha256"] == hashlib.sha256((rel / "weight_diff.json").read_bytes()).hexdigest()

    again = run("recover", "--base", raw, "--diff", rel, "--out", tmp_path / "again", "--format", "xor", "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert report["source"] == "xor release" and report["byte_identical"] is True
    assert {n: f["md5"] for n, f in report["files"].items()} == {n: md5(d) for n, d in tuned_files.items()}
    assert files_of(tmp_path / "again") == tuned_files


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_padding_and_truncation_at_file_ends(tmp_path, monkeypatch, compress):
    monkeypatch.setattr(xor_release, "CHUNK_BYTES", 4)  # chunk boundaries inside every file
    raw, tuned = write_hand_made(tmp_path)
    rel = tmp_path / "rel"
    made = make_xor_release(raw, tuned, rel, compress=compress, command="wb diff --format xor (test)")
    for name, (base, new) in HAND_MADE.items():
        stored = (rel / name).read_bytes()
        assert stored.startswith(b"\x1f\x8b") == compress, name
        assert (gzip.decompress(stored) if compress else stored) == reference_xor(new, base), name
        assert made.files[name]["base_size"] == (None if base is None else len(base))
    lists = dict(line.split("  ")[::-1] for line in (rel / "base.md5").read_text().splitlines())
    assert lists["cut.dat"] == md5(HAND_MADE["cut.dat"][0])  # RAW's whole file, past the truncation
    assert lists["gone.dat"] == md5(b"abcdefgh") and "notes.gz" not in lists
    result = run("recover", "--base", raw, "--diff", rel, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert files_of(tmp_path / "out") == {name: new for name, (_, new) in HAND_MADE.items()}


def test_payload_that_would_start_like_gzip_is_gzipped(tmp_path):
    """Magic bytes decide what a payload is; wb never writes a plain payload that starts with them."""
    raw, tuned = tmp_path / "raw", tmp_path / "tuned"
    raw.mkdir()
    tuned.mkdir()
    (raw / "a.dat").write_bytes(b"\x00\x00rest")
    (tuned / "a.dat").write_bytes(b"\x1f\x8bREST")
    make_xor_release(raw, tuned, tmp_path / "rel")
    assert json.loads((tmp_path / "rel" / "weight_diff.json").read_text())["files"]["a.dat"]["gzip"] is True
    assert gzip.decompress((tmp_path / "rel" / "a.dat").read_bytes()) == reference_xor(b"\x1f\x8bREST", b"\x00\x00rest")
    assert run("recover", "--base", raw, "--diff", tmp_path / "rel", "--out", tmp_path / "out").exit_code == 0
    assert (tmp_path / "out" / "a.dat").read_bytes() == b"\x1f\x8bREST"


def test_tuned_own_recover_json_is_kept(tmp_path):
    """A TUNED that `wb recover` wrote has a recover.json: OUT must hold TUNED's, byte for byte."""
    raw, tuned = write_hand_made(tmp_path)
    (tuned / "recover.json").write_text('{"source": "wb diff"}\n')
    make_xor_release(raw, tuned, tmp_path / "rel")
    result = run("recover", "--base", raw, "--diff", tmp_path / "rel", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "this run's record is not written" in result.stderr
    assert files_of(tmp_path / "out", skip=()) == files_of(tuned, skip=())


def oasst_style(release: Path, folder: Path, compress: bool) -> Path:
    """The release as OpenAssistant publishes one: payload files only (gzipped by xor_codec's --compress,
    its header naming the file), no weight_diff.json, and the model card's `find . -type f -exec md5sum`
    lists saved beside it: './'-prefixed names, in no particular order."""
    folder.mkdir()
    order = random.Random(0)
    for name in json.loads((release / "weight_diff.json").read_text())["files"]:
        data = (release / name).read_bytes()
        if compress:
            with gzip.open(folder / name, "wb") as handle:
                handle.write(data)
        else:
            (folder / name).write_bytes(data)
    for listing in ("base.md5", "result.md5"):
        lines = [f"{digest}  ./{name}" for digest, name in (line.split("  ") for line in (release / listing).read_text().splitlines())]
        order.shuffle(lines)
        (folder / listing).write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_openassistant_layout_without_weight_diff_json(pairs, release, tmp_path, compress):
    raw, tuned = pairs["safetensors-sharded"]
    folder = oasst_style(release, tmp_path / "oasst", compress)
    assert is_xor_release(folder)
    result = run("recover", "--base", raw, "--diff", folder, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"gzip payloads: {len(files_of(tuned)) if compress else 0}" in result.stdout
    assert files_of(tmp_path / "out") == files_of(tuned)


def test_detection_tells_float_diffs_apart(pairs, release, tmp_path):
    raw, tuned = pairs["safetensors-sharded"]
    float_diff = tmp_path / "float"
    assert run("diff", "--base", raw, "--tuned", tuned, "--out", float_diff).exit_code == 0
    assert not is_xor_release(float_diff)  # weight_diff.json with wb_weight_diff_version, no xor marker
    state = {n: torch.zeros(2, 3) + i for i, n in enumerate(["a.weight", "b.weight"])}
    assert not is_xor_release(save_layout(state, tmp_path / "alpaca", "bin-sharded"))  # a plain HF float diff
    assert not is_xor_release(save_layout(state, tmp_path / "knowlm", "safetensors"))
    assert is_xor_release(release)
    payload_only = tmp_path / "payload-only"  # OpenAssistant's folder as downloaded: no lists beside it
    shutil.copytree(release, payload_only)
    for own in ("weight_diff.json", "base.md5", "result.md5"):
        (payload_only / own).unlink()
    assert is_xor_release(payload_only)
    missing = run("recover", "--base", raw, "--diff", payload_only, "--out", tmp_path / "out")
    assert_one_error(missing, "needs its base list base.md5", "save the model card's lists")
    wrong = run("recover", "--base", raw, "--diff", float_diff, "--out", tmp_path / "out", "--format", "xor")
    assert_one_error(wrong, "describes a float diff")
    assert not (tmp_path / "out").exists()


# -- RAW is not the publisher's -----------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["byte", "size", "missing"])
def test_a_base_that_differs_is_named(pairs, release, tmp_path, damage):
    raw, _ = pairs["safetensors-sharded"]
    other = shutil.copytree(raw, tmp_path / "other-raw")
    victim = other / "model-00002-of-00003.safetensors"
    data = bytearray(victim.read_bytes())
    if damage == "byte":
        data[-3] ^= 0x01  # a weight's last bits: what another conversion's rounding looks like
        victim.write_bytes(bytes(data))
    elif damage == "size":
        victim.write_bytes(bytes(data) + b"\0")
    else:
        victim.unlink()
    result = run("recover", "--base", other, "--diff", release, "--out", tmp_path / "out")
    line = assert_one_error(result, "model-00002-of-00003.safetensors", "the base must come from the same conversion")
    assert {"byte": "differs from the file this release was made against", "size": "bytes, the publisher's had",
            "missing": "RAW lacks"}[damage] in line
    assert not (tmp_path / "out").exists()


def test_a_tampered_payload_fails_before_out_appears(pairs, release, tmp_path):
    raw, _ = pairs["safetensors-sharded"]
    damaged = shutil.copytree(release, tmp_path / "damaged")
    payload = damaged / "model-00003-of-00003.safetensors"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x40
    payload.write_bytes(bytes(data))
    result = run("recover", "--base", raw, "--diff", damaged, "--out", tmp_path / "out")
    assert_one_error(result, "decoded model-00003-of-00003.safetensors does not match result.md5", "damaged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]  # no OUT, no temporary left behind


def test_checksums_of_out_are_honoured(pairs, release, tmp_path):
    raw, tuned = pairs["safetensors-sharded"]
    listing = tmp_path / "tuned.sha256"
    listing.write_text("".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files_of(tuned).items()))
    ok = run("recover", "--base", raw, "--diff", release, "--out", tmp_path / "out", "--checksums", listing)
    assert ok.exit_code == 0, ok.output
    assert f"checksums: {len(files_of(tuned))} file(s) OK (sha256)" in ok.stdout
    listing.write_text(f"{'0' * 64}  config.json\n")
    bad = run("recover", "--base", raw, "--diff", release, "--out", tmp_path / "bad", "--checksums", listing)
    assert "FAILED: config.json: sha256 mismatch" in bad.stdout + bad.stderr
    assert bad.exit_code == 1 and not (tmp_path / "bad").exists()


# -- hostile releases -----------------------------------------------------------------------------------
def _edit_list(name: str, change):
    def edit(folder: Path) -> None:
        lines = (folder / name).read_text().splitlines()
        (folder / name).write_text("\n".join(change(lines)) + "\n")
    return edit


def _add_file(folder: Path) -> None:
    (folder / "extra.bin").write_bytes(b"not listed")


def _drop_payload(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def _truncate_gzip(folder: Path) -> None:
    meta = json.loads((folder / "weight_diff.json").read_text())
    target = folder / "config.json"
    data = gzip.compress(target.read_bytes())[:-12]
    target.write_bytes(data)
    meta["files"]["config.json"].update(gzip=True, payload_size=len(data))
    (folder / "weight_diff.json").write_text(json.dumps(meta))


HOSTILE_CASES = {
    "base list leaves its folder": (_edit_list("base.md5", lambda ls: [*ls, f"{'0' * 32}  ../raw-secret"]),
                                    "leaves its folder (..)"),
    "absolute name": (_edit_list("result.md5", lambda ls: [*ls, f"{'0' * 32}  /etc/passwd"]), "is an absolute path"),
    "malformed line": (_edit_list("result.md5", lambda ls: [ls[0], "MD5 (config.json) = 0123", *ls[1:]]),
                       "line 2 is not '<hex>  <file>'"),
    "payload not listed": (_add_file, "the release holds 'extra.bin', which result.md5 does not list"),
    "list names a missing payload": (_drop_payload, "result.md5 names 'tokenizer.json', which the release does not hold"),
    "base list names a file RAW lacks": (_edit_list("base.md5", lambda ls: [*ls, f"{'0' * 32}  optimizer.pt"]),
                                         "RAW lacks optimizer.pt"),
    "truncated gzip": (_truncate_gzip, "payload config.json is a truncated gzip stream"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CASES))
def test_hostile_release_gets_one_error_line(pairs, release, tmp_path, case):
    raw, _ = pairs["safetensors-sharded"]
    damage, fragment = HOSTILE_CASES[case]
    crafted = shutil.copytree(release, tmp_path / "crafted")
    damage(crafted)
    result = run("recover", "--base", raw, "--diff", crafted, "--out", tmp_path / "out")
    assert_one_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_gzip_bomb_without_recorded_sizes_is_bounded(tmp_path, monkeypatch):
    """Without weight_diff.json a gzip payload may decode to its base file's size plus a slack, no more."""
    monkeypatch.setattr(xor_release, "UNRECORDED_GZIP_SLACK", 64)
    raw, tuned = write_hand_made(tmp_path)
    folder = oasst_style(make_xor_release(raw, tuned, tmp_path / "rel").out, tmp_path / "oasst", compress=True)
    (folder / "pad.dat").write_bytes(gzip.compress(bytes(3 + 65)))  # base: 3 bytes
    result = run("recover", "--base", raw, "--diff", folder, "--out", tmp_path / "out")
    assert_one_error(result, "payload pad.dat decodes to more than 67 bytes", "refusing it")
    assert not (tmp_path / "out").exists()


def test_weight_files_are_never_published_in_the_clear(pairs, tmp_path):
    raw, tuned = pairs["safetensors-sharded"]
    single = shutil.copytree(tuned, tmp_path / "tuned")
    shutil.copy(tuned / "model-00001-of-00003.safetensors", single / "model.safetensors")
    result = run("diff", "--format", "xor", "--base", raw, "--tuned", single, "--out", tmp_path / "rel")
    assert_one_error(result, "RAW has no file named model.safetensors", "published in the clear")
    assert not (tmp_path / "rel").exists()


# -- where models live -----------------------------------------------------------------------------
def test_hub_cache_folders_and_relative_paths(pairs, tmp_path):
    raw, tuned = pairs["safetensors-sharded"]
    snapshot = as_hub_cache(raw, tmp_path / "hub")
    work = tmp_path / "work"
    shutil.copytree(tuned, work / "tuned")
    base = os.path.relpath(snapshot, work)  # ../hub/models--wb-test--tiny-llama/snapshots/<rev>
    made = run("diff", "--format", "xor", "--base", base, "--tuned", "tuned", "--out", "rel", "--json", cwd=work)
    assert made.exit_code == 0, made.output
    report = json.loads(made.stdout)
    assert report["format"] == "xor" and report["stored_as_is"] == ["added_tokens.json"]
    assert run("recover", "--base", base, "--diff", "rel", "--out", "out", cwd=work).exit_code == 0
    assert files_of(work / "out") == files_of(tuned)
    published = as_hub_cache(work / "rel", tmp_path / "hub", repo_id="wb-test/tiny-llama-xor")  # the release itself, downloaded
    (published / ".gitattributes").symlink_to(published / "config.json")  # what a hub repo holds beside it: ignored
    result = run("recover", "--base", snapshot, "--diff", published, "--out", tmp_path / "out2")
    assert result.exit_code == 0, result.output
    assert files_of(tmp_path / "out2") == files_of(tuned)


# -- property: whatever a crafted release holds -------------------------------------------------------
FUZZ = os.environ.get("WB_FUZZ", "") not in ("", "0")
PROPERTY = settings(max_examples=int(os.environ.get("WB_FUZZ_EXAMPLES", "3000" if FUZZ else "20")), deadline=None,
                    derandomize=not FUZZ, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def small_releases(tmp_path_factory):
    """variant -> (RAW, TUNED, release) from the hand-made files: plain, gzip, OpenAssistant style."""
    root = tmp_path_factory.mktemp("xor-small")
    raw, tuned = write_hand_made(root)
    (raw / "extra.dat").write_bytes(b"a RAW file TUNED does not have")
    made = {"plain": make_xor_release(raw, tuned, root / "plain").out,
            "gzip": make_xor_release(raw, tuned, root / "gzip", compress=True).out}
    made["oasst"] = oasst_style(made["plain"], root / "oasst", compress=True)
    return raw, tuned, made


@st.composite
def hostile_list(draw, text: str) -> bytes:
    lines = text.splitlines()
    names = [line.split("  ", 1)[1] for line in lines if "  " in line]
    kind = draw(st.sampled_from(["name", "digest", "drop", "duplicate", "garbage", "bytes"]), label="list change")
    at = draw(st.integers(0, max(0, len(lines) - 1)))
    if kind == "bytes":
        return draw(st.one_of(st.just(flipped(draw, text.encode())),
                              st.integers(0, len(text)).map(lambda n: text.encode()[:n])))
    if kind == "name":
        new = draw(st.one_of(st.sampled_from(PATH_STRINGS), st.sampled_from([*names, "extra.dat", "lure.md5"])))
        lines[at] = f"{lines[at][:32]}  {new}"
    elif kind == "digest":
        lines[at] = draw(st.sampled_from("0123456789abcdef")) + lines[at][1:]
    elif kind == "drop":
        del lines[at]
    elif kind == "duplicate":
        lines.insert(at, lines[at])
    else:
        lines.insert(at, draw(st.sampled_from(["# comment", "", "MD5 (x) = 00", "0" * 31 + "  x", "\x00", "  ".join(names)])))
    return "\n".join(lines).encode() + b"\n"


@st.composite
def hostile_payload(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "append", "empty", "gzip"]), label="payload change")
    if kind == "flip":
        return flipped(draw, data) if data else b"\x01"
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "append":
        return data + draw(st.sampled_from([b"\0", b"\x1f\x8b", gzip.compress(b"more")]))
    if kind == "empty":
        return b""
    return gzip.compress(data)[: draw(st.sampled_from([None, -1, -9, 12]))]


@PROPERTY
@given(data=st.data())
def test_crafted_release_rebuilds_exactly_or_fails_in_one_line(small_releases, data):
    raw, tuned, made = small_releases
    variant = data.draw(st.sampled_from(sorted(made)), label="release")
    source = made[variant]
    targets = ["base.md5", "result.md5", "payload"] + (["weight_diff.json"] if (source / "weight_diff.json").exists() else [])
    target = data.draw(st.sampled_from(targets), label="file")
    if target == "payload":
        target = data.draw(st.sampled_from(sorted(HAND_MADE)), label="payload file")
        raw_bytes = data.draw(blobs(hostile_payload((source / target).read_bytes())), label=target)
    elif target == "weight_diff.json":
        meta = json.loads((source / target).read_text())
        raw_bytes = data.draw(hostile_json_file(meta, PATH_STRINGS + sorted(HAND_MADE)), label=target)
    else:
        raw_bytes = data.draw(hostile_list((source / target).read_text()), label=target)
    with Sandbox() as box:
        base, release = box.copy(raw, "raw"), box.copy(source, "release")
        box.write(raw_bytes, "release", target)
        box.write(b"0" * 32 + b"  config.json\n", "lure.md5")  # beside the release: never to be read
        out = box.out("out")
        box.may_read(base, release)
        box.freeze()
        result = run_wb(["recover", "--base", base, "--diff", release, "--out", out])
        box.check(result)
        if result.exit_code == 0:
            assert files_of(out) == files_of(tuned), "a crafted release rebuilt something other than TUNED"
        else:
            assert not out.exists()
