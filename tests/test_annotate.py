"""Human evaluation: the SQLite study, its summary (2-of-3 wins, Fleiss' kappa), and the page driven by
three annotators in a real headless Chromium (the Debian package) through Selenium."""

from __future__ import annotations

import os
import shutil
import sqlite3

import numpy as np
import pytest

from anisora_ray.eval.annotate import AnnotationStore, Candidate, build_study, fleiss_kappa, summarize
from anisora_ray.io.video import write_video


def test_fleiss_kappa_matches_the_textbook_example():
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)  # Fleiss (1971), as on Wikipedia
    assert fleiss_kappa([[3, 0], [0, 3]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[2, 1], [1, 1]])


def study(tmp_path, n: int = 4) -> AnnotationStore:
    store = AnnotationStore(str(tmp_path / "study.sqlite"))
    pairs = [(Candidate(f"p{i}", f"prompt {i}", 7, f"/b{i}.mp4"), Candidate(f"p{i}", f"prompt {i}", 7, f"/t{i}.mp4"))
             for i in range(n)]
    assert store.add_comparisons("round-0", "round-3", pairs, seed=1) == n
    assert store.add_comparisons("round-0", "round-3", pairs, seed=2) == 0  # kept as stored, sides included
    return store


def pick(store: AnnotationStore, comparison: dict, label: str) -> str:
    """The side that shows ``label`` (what a test knows and the page never tells)."""
    return "left" if comparison["left_label"] == label else "right"


def test_sides_are_random_and_recorded_answers_replace_and_the_summary_counts_2_of_3(tmp_path):
    store = study(tmp_path, 8)
    comparisons = store.comparisons()
    assert {c["left_label"] for c in comparisons} == {"round-0", "round-3"}  # trained shown on both sides
    votes = {  # comparison index -> the three annotators' preferred label ("tie")
        0: ["round-3", "round-3", "round-3"], 1: ["round-3", "round-3", "round-0"], 2: ["round-0", "round-0", "tie"],
        3: ["round-3", "tie", "round-0"], 4: ["round-3", "round-3", "tie"], 5: ["tie", "tie", "tie"],
        6: ["round-0", "round-0", "round-0"], 7: ["round-3", "round-3", "round-3"]}
    for i, labels in votes.items():
        for name, label in zip(["ann", "bo", "cy"], labels, strict=True):
            store.answer(name, comparisons[i]["id"], "tie" if label == "tie" else pick(store, comparisons[i], label))
    store.answer("ann", comparisons[6]["id"], "tie")  # a re-submitted answer replaces the earlier one
    store.answer("ann", comparisons[6]["id"], pick(store, comparisons[6], "round-0"))
    assert len(store.answers()) == 24
    s = summarize(store)
    assert s["trained"] == "round-3" and s["judged"] == 8
    assert (s["wins"], s["losses"], s["undecided"]) == (4, 2, 2)  # 0, 1, 4, 7 won; 2, 6 lost; 3, 5 no majority
    assert s["win_rate"] == 0.5 and s["win_rate_ci"][0] < 0.5 < s["win_rate_ci"][1]
    assert s["annotators"]["bo"] == {"answers": 8, "trained": 4, "baseline": 2, "tie": 2}
    # Fleiss' kappa over (trained, tie, baseline), by hand: P̄ = 0.625 (mean agreement per comparison), P_e = 103/288
    # (from the shares 11/24, 6/24, 7/24), κ = (P̄ − P_e) / (1 − P_e) = 77/185; ties merged into either side differ
    assert s["fleiss_kappa"] == pytest.approx(77 / 185, rel=1e-12)
    with pytest.raises(ValueError, match="choice must be one of"):
        store.answer("ann", comparisons[0]["id"], "both")
    with pytest.raises(KeyError, match="no comparison 999"):
        store.answer("ann", 999, "left")
    with pytest.raises(ValueError, match="1-64 characters"):
        store.answer("  ", comparisons[0]["id"], "left")


def test_a_study_of_several_versions_counts_each_against_its_own_comparisons_by_majority(tmp_path):
    """Votes of another pair of versions in the same study are not the trained version's losses, a 2-2 split of four
    annotators is no verdict either way, and the default trained version is the newest round by number."""
    from anisora_ray.eval.annotate import version_order

    store = study(tmp_path, 2)  # round-0 vs round-3: p0, p1
    pairs = [(Candidate(f"p{i}", f"prompt {i}", 7, f"/b{i}.mp4"), Candidate(f"p{i}", f"prompt {i}", 7, f"/n{i}.mp4"))
             for i in range(2)]
    store.add_comparisons("round-0", "round-10", pairs, seed=1)
    for c in store.comparisons():
        labels = {c["left_label"], c["right_label"]}
        if labels == {"round-0", "round-10"}:
            wanted = ["round-10"] * 3
        else:
            wanted = ["round-3"] * 3 if c["prompt_id"] == "p0" else ["round-3", "round-3", "round-0", "round-0"]
        for name, label in zip(["ann", "bo", "cy", "di"], wanted, strict=False):
            store.answer(name, c["id"], pick(store, c, label))
    three = summarize(store, trained="round-3")
    assert (three["comparisons"], three["judged"], three["wins"], three["losses"], three["undecided"]) == (2, 2, 1, 0, 1)
    assert three["annotators"]["di"] == {"answers": 1, "baseline": 1}
    newest = summarize(store)
    assert newest["trained"] == "round-10" and (newest["judged"], newest["wins"], newest["losses"]) == (2, 2, 0)
    assert summarize(store, trained="round-10", baseline="round-3")["comparisons"] == 0  # never compared
    assert version_order(["gapo", "round-10", "round-3", "round-0"]) == ["round-0", "round-3", "round-10", "gapo"]


def test_the_summary_judges_the_served_studys_trained_version_whatever_the_labels_sort_as(tmp_path, capsys):
    """``anisora-ray eval`` labels are names: "aligned" sorts before "baseline", and with no record of which
    version was the baseline the summary once judged the baseline and reported the trained one's wins as losses."""
    from anisora_ray.cli import main

    store = AnnotationStore(str(tmp_path / "annotations.sqlite"))
    pairs = [(Candidate(f"p{i}", f"prompt {i}", 7, f"/b{i}.mp4"), Candidate(f"p{i}", f"prompt {i}", 7, f"/a{i}.mp4"))
             for i in range(4)]
    store.add_comparisons("baseline", "aligned", pairs, seed=1)
    for c in store.comparisons():
        for name in ("ann", "bo", "cy"):
            store.answer(name, c["id"], pick(store, c, "aligned"))
    s = summarize(store)
    assert (s["trained"], s["baseline"], s["wins"], s["losses"], s["win_rate"]) == ("aligned", "baseline", 4, 0, 1.0)
    # a second study in the same file (an ablation variant against the same baseline): the newest served is the default
    store.add_comparisons("baseline", "sft", [(b, Candidate(b.prompt_id, b.prompt, 7, "/s.mp4")) for b, _ in pairs])
    assert (summarize(store)["trained"], summarize(store)["judged"]) == ("sft", 0)
    assert summarize(store, trained="aligned")["baseline"] == "baseline"
    assert main(["annotate", "summarize", "--eval", str(tmp_path), "--trained", "aligned", "--baseline", "baseline",
                 "--json", str(tmp_path / "s.json")]) == 0
    import json

    assert json.loads((tmp_path / "s.json").read_text())["wins"] == 4
    # the newest study, not answered yet: said in words, and its JSON has null (not NaN, which JSON parsers refuse)
    capsys.readouterr()
    assert main(["annotate", "summarize", "--eval", str(tmp_path), "--json", str(tmp_path / "none.json")]) == 0
    assert "no win rate yet: no comparison has a majority" in capsys.readouterr().out
    text = (tmp_path / "none.json").read_text()
    assert "NaN" not in text and json.loads(text)["win_rate"] is None


def tiny_align_dir(root) -> str:
    """An align/ folder with held-out candidates of round 0 and round 2 (3 prompts × 1 seed), real mp4s."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for r in (0, 2):
        rows = []
        for i in range(3):
            video = str(root / f"round-{r}" / "eval" / "videos" / f"p{i}.mp4")
            write_video(rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8), video, fps=8)
            rows.append({"prompt_id": f"heldout-{i}", "prompt": f"a character number {i} waves", "seed": 100 + i,
                         "video_uri": video})
        pq.write_table(pa.Table.from_pylist(rows), str(root / f"round-{r}" / "eval" / "candidates.parquet"))
    return str(root)


def test_the_page_answers_to_the_names_a_browser_sends():
    from anisora_ray.eval.annotate_server import allowed_hosts

    assert allowed_hosts("127.0.0.1", 8765) == {"127.0.0.1:8765", "localhost:8765", "[::1]:8765"}
    assert allowed_hosts("MyBox.lan", 8765) == {"mybox.lan:8765"}  # browsers send host names in lower case
    assert "localhost" in allowed_hosts("localhost", 80)  # and leave out port 80
    assert allowed_hosts("0.0.0.0", 8765) is None  # opened to the network on purpose: any name


def test_a_study_needs_both_sides_videos_and_the_server_says_what_it_cannot_serve_or_store(tmp_path):
    import json
    import urllib.error
    import urllib.request

    from anisora_ray.errors import ConfigError
    from anisora_ray.eval.annotate_server import serve

    align = tiny_align_dir(tmp_path / "align")
    store = build_study(align)
    server = serve(store, host="127.0.0.1", port=0, background=True)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        first = store.comparisons()[0]
        assert urllib.request.urlopen(f"{url}/video/{first['id']}/left").read()[4:8] == b"ftyp"
        os.remove(first["left_uri"])  # pruned after the study was built
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url}/video/{first['id']}/left")
        said = missing.value.read()
        assert missing.value.code == 404 and b"not readable" in said and b"round-" not in said  # the path tells the side
        def post(body, **headers):
            request = urllib.request.Request(f"{url}/api/answer", data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json", **headers})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request)
            return refused.value.code, refused.value.read()

        assert post([1]) == (400, b"answer not stored: expected a JSON object, got list")
        # another site's page, while the annotator has it open: a simple (text/plain) post, or one naming its origin
        vote = {"annotator": "x", "comparison": first["id"], "choice": "left"}
        assert post(vote, **{"Content-Type": "text/plain"})[0] == 415
        assert post(vote, Origin="http://evil.example")[0] == 403
        # DNS rebinding: another site's name resolved to 127.0.0.1, its page's requests name it as Host and Origin
        rebound = {"Host": f"evil.example:{server.server_address[1]}", "Origin": f"http://evil.example:{server.server_address[1]}"}
        assert post(vote, **rebound)[0] == 421
        with pytest.raises(urllib.error.HTTPError) as read:
            urllib.request.urlopen(urllib.request.Request(f"{url}/api/next?annotator=x", headers=rebound))
        assert read.value.code == 421  # nor can it read the held-out prompts
        too_big = urllib.request.Request(f"{url}/api/answer", data=b" " * (64 * 1024 + 1), method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as big:
            urllib.request.urlopen(too_big)
        assert big.value.code == 413
        assert store.answers() == []  # none was stored
        assert urllib.request.urlopen(f"http://localhost:{server.server_address[1]}/").status == 200  # its own names
    finally:
        server.shutdown()
    with pytest.raises(ConfigError, match=r"1 held-out video\(s\) of round-0 or round-2 are not there"):
        build_study(align, str(tmp_path / "again.sqlite"))


def test_three_annotators_answer_every_comparison_in_a_real_browser_and_the_summary_reads_back(tmp_path):
    """Headless Chromium (Debian's `chromium` + `chromium-driver`) through Selenium: three annotators log in,
    answer with buttons and keys; the stored answers and the summary match what they chose."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no system Chromium / chromedriver (Debian: apt-get install chromium chromium-driver); "
                    ".ci/run installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from anisora_ray.eval.annotate_server import serve

    align = tiny_align_dir(tmp_path / "align")
    store = build_study(align)
    assert store.path == os.path.join(align, "annotations.sqlite") and len(store.comparisons()) == 3
    server = serve(store, host="127.0.0.1", port=0, background=True)
    host, port = server.server_address
    assert host == "127.0.0.1"  # loopback by default
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--mute-audio"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    wanted = {"ann": "round-2", "bo": "round-2", "cy": "round-0"}  # what each annotator prefers, every time
    try:
        for name, preferred in wanted.items():
            browser.get(f"http://127.0.0.1:{port}/")
            browser.find_element(By.ID, "name").send_keys(name + Keys.ENTER)
            wait = WebDriverWait(browser, 20)
            for k in range(3):
                wait.until(lambda b, k=k: b.find_element(By.ID, "progress").text.startswith(f"{k} / 3"))
                wait.until(lambda b: b.execute_script("return document.getElementById('left').readyState") >= 1)
                src = browser.find_element(By.ID, "left").get_attribute("src")
                comparison = store.comparison(int(src.split("/")[-2]))
                assert "round-0" not in browser.page_source and "round-2" not in browser.page_source  # hidden
                side = pick(store, comparison, preferred)
                if k == 0:  # a button
                    browser.find_element(By.ID, f"choose-{side}").click()
                else:  # a key
                    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT if side == "left" else
                                                                       Keys.ARROW_RIGHT)
            wait.until(ec.visibility_of_element_located((By.ID, "done")))
            assert browser.find_element(By.ID, "done-progress").text == "3 / 3 answered"
    finally:
        browser.quit()
        server.shutdown()
    answers = store.answers()
    assert len(answers) == 9
    for a in answers:
        c = store.comparison(a["comparison_id"])
        assert c[f"{a['choice']}_label"] == wanted[a["annotator"]]
    s = summarize(store)
    assert (s["trained"], s["judged"], s["wins"], s["losses"]) == ("round-2", 3, 3, 0)  # 2 of 3 prefer round 2
    assert s["annotators"]["cy"] == {"answers": 3, "baseline": 3}
    with sqlite3.connect(store.path) as db:  # a real database: one row per answer, readable by anyone
        assert db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 9


def test_report_shows_the_human_study_summary(tmp_path):
    """The HTML report reads an answered study beside the job and shows its win rate, CI, kappa and annotators."""
    from anisora_ray.loop.html_report import human_section

    store = AnnotationStore(str(tmp_path / "annotations.sqlite"))
    pairs = [(Candidate(f"p{i}", "a girl", 0, f"b{i}.mp4"), Candidate(f"p{i}", "a girl", 0, f"t{i}.mp4")) for i in range(4)]
    store.add_comparisons("round-0", "round-3", pairs, seed=1)
    for c in store.comparisons():
        trained_side = "left" if c["left_label"] == "round-3" else "right"
        for name in ("ann", "bo", "cy"):  # trained wins p0-p2 by all three; p3 is a tie for everyone
            store.answer(name, c["id"], "tie" if c["prompt_id"] == "p3" else trained_side)
    s = summarize(store)
    page = human_section(str(tmp_path / "annotations.sqlite"))
    assert f"Win rate {s['win_rate']:.3f}" in page and s["wins"] == 3 and s["judged"] == 4
    assert "Fleiss' kappa 1.000" in page and page.count("<tr>") == 4  # header + three annotators
    assert human_section(str(tmp_path / "missing.sqlite")) == ""
