"""The progress bar: loss, tokens/s, MFU and ETA (tqdm's), on rank 0 only."""

from __future__ import annotations


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, m: dict) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{m['loss']:.3f}", "tok/s": f"{m['tok_s']:,.0f}"}
        if "mfu" in m:
            post["mfu"] = f"{100 * m['mfu']:.1f}%"
        if "val_loss" in m:
            post["val"] = f"{m['val_loss']:.3f}"
        if "load_cv" in m and m["load_cv"]:
            post["load_cv"] = f"{sum(m['load_cv']) / len(m['load_cv']):.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
