"""What people look at: reward curves, winner | loser videos side by side, registered model versions."""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np

from anisora_ray.io import fs
from anisora_ray.io.video import read_all_frames, write_video
from anisora_ray.types import PreferencePair

log = logging.getLogger(__name__)


def side_by_side(pair: PreferencePair, uri: str, fps: int) -> str:
    """One mp4: the winner on the left, the loser on the right, a white bar between."""
    return side_by_side_videos(pair.winner_video_uri, pair.loser_video_uri, uri, fps)


def side_by_side_videos(left_uri: str, right_uri: str, uri: str, fps: int) -> str:
    """One mp4 at ``uri``: the video at ``left_uri`` on the left, ``right_uri``'s on the right, a white bar between."""
    left, right = read_all_frames(left_uri), read_all_frames(right_uri)
    frames = min(len(left), len(right))
    width = max(2, left.shape[2] // 32)
    width += width % 2  # even, so the whole is (H.264's yuv420p needs even sizes: a 480 px video's bar was 15)
    bar = np.full((frames, left.shape[1], width, 3), 255, np.uint8)
    write_video(np.concatenate([left[:frames], bar, right[:frames]], axis=2), uri, fps=fps)
    return uri


def plot_reward_curve(rows: list[dict], png_uri: str, title: str) -> str:
    """Held-out mean reward per round (with the bootstrap CI of the gain over round 0) and per dimension.

    ``rows``: one dict per round: ``round``, ``heldout_reward``, optional ``ci_low``/``ci_high``
    (of the gain) and ``heldout_<dimension>`` entries.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax, ax_dims) = plt.subplots(1, 2, figsize=(11, 4))
    total = [r["heldout_reward"] for r in rows]
    ax.plot(rounds, total, "o-", color="C0", label="held-out mean reward")
    base = total[0]
    low = [base + r["ci_low"] if "ci_low" in r else np.nan for r in rows]
    high = [base + r["ci_high"] if "ci_high" in r else np.nan for r in rows]
    ax.fill_between(rounds, low, high, color="C0", alpha=0.2, label="round 0 + 95% CI of the gain")
    ax.set_xlabel("round")
    ax.set_ylabel("reward")
    ax.set_xticks(rounds)
    ax.legend()
    ax.set_title(title)
    dims = sorted(k.removeprefix("heldout_") for k in rows[0] if k.startswith("heldout_") and k not in
                  ("heldout_reward", "heldout_quarantined"))
    for i, name in enumerate(dims):
        ax_dims.plot(rounds, [r.get(f"heldout_{name}", np.nan) for r in rows], "o-", color=f"C{i}", label=name)
    ax_dims.set_xlabel("round")
    ax_dims.set_ylabel("normalized score")
    ax_dims.set_xticks(rounds)
    ax_dims.legend(fontsize=7)
    ax_dims.set_title("held-out score per dimension")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "curve.png")
        fig.savefig(local, dpi=110)
        plt.close(fig)
        with open(local, "rb") as f:
            fs.write_bytes(png_uri, f.read())
    return png_uri


def register_weights(name: str, weights_uri: str, run_id: str, round_index: int, weights_version: int) -> str | None:
    """A model version of the round's weights, which stay where they are (nothing is copied): a pointer file
    (``weights.json``: the folder, the round, the version) is logged to the round's run and the version registered
    from there, since a tracking server that serves artifacts (``--serve-artifacts``, cluster/kuberay/mlflow.yaml)
    refuses a source outside the run's artifacts; the tag ``weights_uri`` names the folder. None, said, when the
    registry refuses: bookkeeping never fails a round."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    folder = f"registered-weights/round-{round_index}"
    where = fs.normalize(weights_uri) if fs.is_url(weights_uri) or os.path.exists(weights_uri) else weights_uri  # Hub id
    try:
        try:
            client.create_registered_model(name, description="anisora-ray generator weights, one version per round")
        except MlflowException:
            pass  # exists
        client.log_dict(run_id, {"weights_uri": where, "round": round_index, "weights_version": weights_version},
                        f"{folder}/weights.json")
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{folder}"
        version = client.create_model_version(name, source=source, run_id=run_id,
                                              tags={"round": str(round_index), "weights_version": str(weights_version),
                                                    "weights_uri": where})
    except MlflowException as exc:
        log.warning("round %d's weights (%s) not registered as a version of model %r: %s", round_index, where, name,
                    str(exc).splitlines()[0][:300])
        return None
    return str(version.version)  # the registry may answer an int; state and guard.json keep strings


def contact_sheet(align_dir: str, last: int, png_uri: str, prompts: int = 6, frames: int = 4, cell: int = 96) -> str:
    """A PNG people can look at: per held-out prompt (first seed), the input image, then ``frames`` frames of
    round 0, then the same frames of round ``last`` (same prompt, same seed), upscaled to ``cell`` pixels."""
    from PIL import Image, ImageDraw

    from anisora_ray.io.images import load_image

    def rows_of(index: int) -> dict:
        table = fs.read_table(fs.join(align_dir, f"round-{index}", "eval", "scores.parquet")).to_pylist()
        return {(r["prompt_id"], r["seed"]): r for r in table if r["candidate_index"] == 0 and not r.get("quarantine_reason")}

    before, after = rows_of(0), rows_of(last)
    keys = sorted(k for k in before if k in after)[:prompts]
    if not keys:
        raise ValueError(f"rounds 0 and {last} share no scored held-out candidate")
    gap, label = 6, 18
    width = cell * (1 + 2 * frames) + gap * 3
    sheet = Image.new("RGB", (width, label + len(keys) * (cell + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for x, text in ((0, "input image"), (cell + gap, "round 0"), (cell * (1 + frames) + 2 * gap, f"round {last}")):
        draw.text((x + 2, 3), text, fill="black")
    for row, key in enumerate(keys):
        y = label + row * (cell + gap)
        sheet.paste(load_image(before[key]["image_uri"]).resize((cell, cell), Image.Resampling.LANCZOS), (0, y))
        for block, source in enumerate((before[key], after[key])):
            clip = read_all_frames(source["video_uri"])
            picks = np.linspace(0, len(clip) - 1, frames).round().astype(int)
            x0 = cell + gap + block * (cell * frames + gap)
            for j, k in enumerate(picks):
                sheet.paste(Image.fromarray(clip[k]).resize((cell, cell), Image.Resampling.NEAREST), (x0 + j * cell, y))
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "sheet.png")
        sheet.save(local)
        with open(local, "rb") as f:
            fs.write_bytes(png_uri, f.read())
    return png_uri
