"""Dashboard benchmarks: what a user of the two Panel apps waits for.

Measured with Debian's chromium driven by Playwright against ``panel serve`` (the README's
command, in a subprocess, on a fresh store):

1. **first render** of each page (goal ≤ 5 s): from ``goto`` to the controls being drawn and to
   the first plotly graph with data — the first visit to a fresh server (started with ``--warm``
   like the README's command: imports paid at start, the Fisher explorer's default study computing
   in the background) and later visits (median);
2. **control change → visible** (goal ≤ 0.5 s): click the approximation toggle while K-FAC
   trains, until the new event marker is drawn in the page (median and p90 over trials);
3. **training throughput** with the Training lab open in a browser vs a headless ``Session``
   (goal ≥ 0.9×): steps per second of the same problem, interleaved rounds, medians;
4. **soak**: N concurrent browser sessions (half Training lab, training; half Fisher explorer)
   for ``--duration`` seconds (default 120): page errors, server errors, server memory growth
   (goal < 10 %: RSS at the end against RSS once every page had loaded and warmed up).

The browser runs on the same machine as the server (it competes for the same cores).

    python benchmarks/bench_dashboard.py                       # the full run (~6 minutes)
    python benchmarks/bench_dashboard.py --duration 30 --rounds 2 --out benchmarks/results/dashboard_quick
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    from .common import machine, write_results
except ImportError:  # run as a script
    from common import machine, write_results

from kfac_lab.viz.export import LAUNCH_ARGS, NO_CHROMIUM, find_chromium  # noqa: E402 (after the path set-up above)

CURVE_LEN = ("el => { const d = (el.data || []).filter(t => t.name !== 'events'); "
             "return d.length ? d[0].x.length : 0 }")
PARTS = ("first_render", "control_latency", "throughput", "soak")
N_EVENTS = "el => (el.data || []).filter(t => t.name === 'events').reduce((n, t) => n + t.x.length, 0)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    return find_chromium() or sys.exit(f"bench_dashboard: {NO_CHROMIUM}")


class Server:
    """``panel serve dashboards/training_lab.py dashboards/fisher_explorer.py`` in a subprocess."""

    def __init__(self, store: Path):
        from kfac_lab.dashboards.common import panel_serve_args

        self.port = free_port()
        args = panel_serve_args(port=self.port)
        args[0] = str(Path(sys.executable).with_name("panel"))
        env = {**os.environ, "KFAC_LAB_STORE": str(store), "PYTHONUNBUFFERED": "1"}
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(self.url("training_lab"), timeout=30):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() - t0 > 120:
                    raise RuntimeError("panel serve did not come up:\n" + Path(self.log.name).read_text()[-3000:])
                time.sleep(0.3)

    def url(self, app: str) -> str:
        return f"http://127.0.0.1:{self.port}/{app}"

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def errors(self) -> list[str]:
        text = Path(self.log.name).read_text()
        lines = text.splitlines()
        bad = [i for i, ln in enumerate(lines) if re.search(r"\bERROR\b|Traceback", ln)]
        # a browser closing its websocket mid-message is not an application error
        return ["\n".join(lines[i:i + 6]) for i in bad if "WebSocketClosedError" not in "\n".join(lines[i:i + 12])
                and "StreamClosedError" not in "\n".join(lines[i:i + 12])]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # like Ctrl-C: sessions stop at a step boundary, flush
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def watch(page, errors: list[str], port: int, external: list[str]) -> None:
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("request", lambda r: None if r.url.startswith((f"http://127.0.0.1:{port}/", f"ws://127.0.0.1:{port}/",
                                                          "blob:", "data:")) else external.append(r.url))


def wait_js(locator, js: str, cond, timeout: float = 120.0, every: float = 0.01):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            v = locator.evaluate(js)
        except Exception:  # noqa: BLE001 - not there yet
            v = None
        if cond(v):
            return v
        time.sleep(every)
    raise TimeoutError(f"{js} did not satisfy the condition within {timeout} s")


def start_training(page, problem: str = "tiny", steps: str = "0") -> None:
    from kfac_lab.dashboards.training_lab import PROBLEMS

    label = {v: k for k, v in PROBLEMS.items()}[problem]
    page.locator(".kfac-problem select").select_option(label=label)
    f = page.locator(".kfac-field-steps input")
    f.fill(steps)
    f.press("Enter")
    time.sleep(0.3)
    page.locator(".kfac-start button").click()


# --------------------------------------------------------------------------- 1. first render
def first_render(browser, server: Server, visits: int, errors: list, external: list) -> dict:
    out = {}
    drawn = "el => !!el._fullLayout"                      # the (empty) training plot is drawn
    has_data = "el => !!el._fullLayout && (el.data || []).length > 0"   # figure 1 is drawn
    for app, controls, fig_css, js in (
            ("training_lab", ".kfac-start button", ".kfac-fig-step .js-plotly-plot", drawn),
            ("fisher_explorer", ".kfac-compute button", ".kfac-fig-figure1 .js-plotly-plot", has_data)):
        rows = []
        for _ in range(visits):
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = ctx.new_page()
            watch(page, errors, server.port, external)
            t0 = time.perf_counter()
            page.goto(server.url(app))
            page.locator(controls).wait_for(timeout=120_000)
            t_controls = time.perf_counter() - t0
            fig = page.locator(fig_css)
            fig.wait_for(timeout=120_000)
            wait_js(fig, js, bool, timeout=300, every=0.02)
            rows.append({"controls_s": t_controls, "figure_s": time.perf_counter() - t0})
            ctx.close()
        out[app] = {"first_visit": rows[0], "later_visits_median": {
            k: statistics.median(r[k] for r in rows[1:]) for k in rows[0]} if len(rows) > 1 else None, "visits": rows}
    return out


# --------------------------------------------------------------------------- 2. control latency
def control_latency(browser, server: Server, trials: int, errors: list, external: list) -> dict:
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    watch(page, errors, server.port, external)
    page.goto(server.url("training_lab"))
    fig = page.locator(".kfac-fig-step .js-plotly-plot")
    fig.wait_for(timeout=120_000)
    start_training(page, "tiny")
    wait_js(fig, CURVE_LEN, lambda v: (v or 0) >= 5, timeout=120)
    lat = []
    options = ["block-tridiagonal", "block-diagonal"]
    for i in range(trials):
        n0 = wait_js(fig, N_EVENTS, lambda v: v is not None)
        t0 = time.perf_counter()
        page.get_by_role("button", name=options[i % 2]).click()
        wait_js(fig, N_EVENTS, lambda v: (v or 0) > n0, timeout=30, every=0.005)
        lat.append(time.perf_counter() - t0)
        time.sleep(0.7)
    page.locator(".kfac-stop button").click()
    ctx.close()
    lat.sort()
    return {"trials": len(lat), "median_s": statistics.median(lat), "p90_s": lat[int(0.9 * (len(lat) - 1))],
            "max_s": lat[-1], "all_s": lat, "problem": "tiny"}


# --------------------------------------------------------------------------- 3. throughput
def headless_rate(problem: str, seconds: float, store: Path) -> float:
    code = f"""
import time
from kfac_lab.train import Session
s = Session({problem!r}, "kfac", store={str(store)!r}, checkpoint_every=100)
s.start()
while s.step < 3: time.sleep(0.01)
t0, k0 = time.perf_counter(), s.step
time.sleep({seconds})
t1, k1 = time.perf_counter(), s.step
s.stop()
print("RATE", (k1 - k0) / (t1 - t0))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(re.search(r"RATE (\S+)", out.stdout).group(1))


def attached_rate(browser, server: Server, problem: str, seconds: float, errors: list, external: list) -> float:
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    watch(page, errors, server.port, external)
    page.goto(server.url("training_lab"))
    page.locator(".kfac-fig-step .js-plotly-plot").wait_for(timeout=120_000)
    start_training(page, problem)
    status = page.locator(".kfac-status")
    js = ("el => { const t = Array.from((el.shadowRoot || el).children).map(c => c.innerText || '').join(' '); "
          "const m = t.match(/step (\\d+) ·/); return m ? +m[1] : 0 }")
    wait_js(status, js, lambda v: (v or 0) >= 3, timeout=120, every=0.05)
    # the status card shows the session's step (refreshed twice a second): sample its changes
    k_prev = wait_js(status, js, lambda v: v is not None)
    k0 = wait_js(status, js, lambda v: v != k_prev, timeout=5, every=0.01)  # the moment it changes
    t0 = time.perf_counter()
    time.sleep(seconds)
    k_prev = wait_js(status, js, lambda v: v is not None)
    k1 = wait_js(status, js, lambda v: v != k_prev, timeout=5, every=0.01)  # the moment it changes
    t1 = time.perf_counter()
    page.locator(".kfac-stop button").click()
    time.sleep(0.5)
    ctx.close()
    return (k1 - k0) / (t1 - t0)


def throughput(browser, server: Server, problems: list[str], rounds: int, seconds: float, errors, external,
               store_dir: Path) -> dict:
    out = {}
    for problem in problems:
        head, att = [], []
        for r in range(rounds):  # interleaved: the machine's ups and downs hit both alike
            head.append(headless_rate(problem, seconds, store_dir / f"headless-{problem}-{r}.zarr"))
            att.append(attached_rate(browser, server, problem, seconds, errors, external))
        out[problem] = {"headless_steps_per_s": statistics.median(head), "attached_steps_per_s": statistics.median(att),
                        "ratio": statistics.median(att) / statistics.median(head), "rounds": rounds,
                        "seconds_per_round": seconds, "headless_all": head, "attached_all": att}
    return out


# --------------------------------------------------------------------------- 4. soak
def soak(browser, server: Server, sessions: int, duration: float, errors: list, external: list) -> dict:
    pages = []
    for i in range(sessions):
        ctx = browser.new_context(viewport={"width": 1200, "height": 900})
        page = ctx.new_page()
        watch(page, errors, server.port, external)
        app = "training_lab" if i % 2 == 0 else "fisher_explorer"
        page.goto(server.url(app))
        if app == "training_lab":
            page.locator(".kfac-fig-step .js-plotly-plot").wait_for(timeout=180_000)
            start_training(page, "tiny")
        else:
            page.locator(".kfac-fig-figure1 .js-plotly-plot").wait_for(timeout=180_000)
        pages.append((app, ctx, page))
    for app, _, page in pages:  # every page has drawn its first data
        css = ".kfac-fig-step .js-plotly-plot" if app == "training_lab" else ".kfac-fig-figure1 .js-plotly-plot"
        wait_js(page.locator(css), "el => (el.data || []).length && (el.data[0].x || []).length", bool, timeout=300,
                every=0.2)
    warm = min(20.0, duration / 4)
    time.sleep(warm)
    base = server.rss_mb()
    samples = [(0.0, base)]
    t0 = time.monotonic()
    lengths0 = [p.locator(".kfac-fig-step .js-plotly-plot").evaluate(CURVE_LEN) for a, _, p in pages
                if a == "training_lab"]
    while time.monotonic() - t0 < duration:
        time.sleep(min(5.0, max(0.0, duration - (time.monotonic() - t0))))
        samples.append((time.monotonic() - t0, server.rss_mb()))
    lengths1 = [p.locator(".kfac-fig-step .js-plotly-plot").evaluate(CURVE_LEN) for a, _, p in pages
                if a == "training_lab"]
    end = samples[-1][1]
    peak = max(m for _, m in samples)
    for _, ctx, _ in pages:
        ctx.close()
    return {"sessions": sessions, "duration_s": duration, "warmup_s": warm, "rss_start_mb": base, "rss_end_mb": end,
            "rss_peak_mb": peak, "growth_end": end / base - 1, "growth_peak": peak / base - 1,
            "all_pages_streaming": all(b > a for a, b in zip(lengths0, lengths1)), "rss_samples": samples}


# --------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    fr, cl, tp, sk = res["first_render"], res["control_latency"], res["throughput"], res["soak"]
    ok = lambda good: "✅" if good else "❌"  # noqa: E731
    lines = [
        "# Dashboard benchmarks", "",
        f"`{res['command']}` — {res['machine']['cpu']} ({res['machine']['cores']} cores), load average at start "
        f"{res['load_start']}. Browser (Debian chromium {res['chromium']}) on the same machine. Server: "
        "`panel serve dashboards/training_lab.py dashboards/fisher_explorer.py` (127.0.0.1, fresh store).", "",
        "| measure | goal | result | |", "|---|---|---|---|",
    ]
    for app in ("training_lab", "fisher_explorer"):
        f = fr[app]
        later = f["later_visits_median"] or f["first_visit"]
        lines.append(f"| first render, {app}: controls / first graph (fresh server) | ≤ 5 s | "
                     f"{f['first_visit']['controls_s']:.2f} s / {f['first_visit']['figure_s']:.2f} s | "
                     f"{ok(f['first_visit']['figure_s'] <= 5)} |")
        lines.append(f"| first render, {app}: later visits (median of {len(f['visits']) - 1}) | ≤ 5 s | "
                     f"{later['controls_s']:.2f} s / {later['figure_s']:.2f} s | {ok(later['figure_s'] <= 5)} |")
    lines.append(f"| control change → marker drawn (tiny, median / p90 of {cl['trials']}) | ≤ 0.5 s | "
                 f"{cl['median_s']:.3f} s / {cl['p90_s']:.3f} s | {ok(cl['median_s'] <= 0.5)} |")
    for problem, t in tp.items():
        lines.append(f"| throughput {problem}: lab attached / headless (median of {t['rounds']}) | ≥ 0.9× | "
                     f"{t['attached_steps_per_s']:.1f} / {t['headless_steps_per_s']:.1f} steps/s = "
                     f"{t['ratio']:.2f}× | {ok(t['ratio'] >= 0.9)} |")
    lines.append(f"| {sk['sessions']} sessions × {sk['duration_s']:.0f} s: server RSS growth (end / peak) | < 10 % | "
                 f"{100 * sk['growth_end']:+.1f} % / {100 * sk['growth_peak']:+.1f} % "
                 f"({sk['rss_start_mb']:.0f} → {sk['rss_end_mb']:.0f} MB) | {ok(sk['growth_end'] < 0.10)} |")
    n_err = len(res["page_errors"]) + len(res["server_errors"])
    lines.append(f"| errors: page console / server log; external requests | 0 | {len(res['page_errors'])} / "
                 f"{len(res['server_errors'])}; {len(res['external_requests'])} | "
                 f"{ok(n_err == 0 and not res['external_requests'])} |")
    lines += ["", f"All training pages kept streaming during the soak: {sk['all_pages_streaming']}.", ""]
    if res["page_errors"] or res["server_errors"]:
        lines += ["Errors:", ""] + [f"- `{e[:300]}`" for e in res["page_errors"] + res["server_errors"]] + [""]
    lines += ["Notes: the server is started with `--warm` (as `panel_serve_args` and `make lab` do): it builds each "
              "page once before it listens, so the imports (torch, xarray, plotly) are paid at start, and the Fisher "
              "explorer's default study (the figure-1 network trained, F, F̃, cumulants) starts computing in the "
              "background then; a visitor arriving before it is done sees figure 1 as soon as the Fisher study is "
              "ready, the cumulants after. \"first graph\" is the first plotly graph with data (Fisher explorer) "
              "or drawn (Training lab, empty until Start). The throughput of the lab includes the browser drawing "
              "on the same cores. These machines are noisy; see the JSON for every sample.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=120.0, help="soak duration in seconds (default 120)")
    ap.add_argument("--sessions", type=int, default=10, help="concurrent browser sessions in the soak (default 10)")
    ap.add_argument("--visits", type=int, default=4, help="page visits per app for the first-render times")
    ap.add_argument("--trials", type=int, default=12, help="control-change trials")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds per problem")
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds per throughput measurement")
    ap.add_argument("--problems", nargs="+", default=["tiny", "mnist-small"], help="throughput problems")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="measure only these parts (default: all; a partial run writes no table unless --out is given)")
    ap.add_argument("--out", default=None, help="results prefix (default: runs/benchmarks/dashboard, ignored by git; "
                    "--out benchmarks/results/dashboard rewrites the tracked table)")
    args = ap.parse_args()
    partial = set(args.parts) != set(PARTS)
    if args.out is None:
        args.out = None if partial else str(ROOT / "runs" / "benchmarks" / "dashboard")

    from playwright.sync_api import sync_playwright

    exe = chromium()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip().split(" ")[1]
    errors: list[str] = []
    external: list[str] = []
    res = {"command": " ".join(["python benchmarks/bench_dashboard.py"] + sys.argv[1:]), "machine": machine(),
           "chromium": version, "load_start": os.getloadavg()[0], "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        tmp = Path(tmp)
        browser = pw.chromium.launch(executable_path=exe, args=LAUNCH_ARGS, headless=True)
        server = Server(tmp / "lab.zarr")
        try:
            if "first_render" in args.parts:
                print("first render …", flush=True)
                res["first_render"] = first_render(browser, server, args.visits, errors, external)
            if "control_latency" in args.parts:
                print("control latency …", flush=True)
                res["control_latency"] = control_latency(browser, server, args.trials, errors, external)
            if "throughput" in args.parts:
                print("throughput …", flush=True)
                res["throughput"] = throughput(browser, server, args.problems, args.rounds, args.seconds, errors,
                                               external, tmp)
            if "soak" in args.parts:
                print(f"soak: {args.sessions} sessions for {args.duration:.0f} s …", flush=True)
                res["soak"] = soak(browser, server, args.sessions, args.duration, errors, external)
        finally:
            res["server_errors"] = server.errors()
            server.stop()
            browser.close()
    res["page_errors"] = errors
    res["external_requests"] = sorted(set(external))
    res["load_end"] = os.getloadavg()[0]
    if args.out is None:  # a partial run: print what was measured
        print(json.dumps({k: res[k] for k in PARTS if k in res}, indent=1, default=str))
        print("page errors:", errors, "server errors:", res["server_errors"], "external:", res["external_requests"])
        return
    write_results(args.out, res, markdown(res) if not partial else json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
