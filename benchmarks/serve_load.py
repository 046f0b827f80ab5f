"""Load test of `reverie serve`: N concurrent clients on localhost for a bounded time, then 1,000 requests for
memory.

For each server mode (batching on, and --no-batching for comparison) and each client count, every client
posts /sdapi/v1/txt2img (one image, its own prompt and seed) in a loop for --seconds. Reported: images per
second, p50 / p95 latency, failed requests (anything but 200; target zero at 8 clients). Then, on the
batching server, the resident memory of the server process before and after --memory-requests requests
(a tenth of them malformed, a tenth through the /v1/jobs polling route), sampled every quarter.

    python benchmarks/serve_load.py                       # the figures in the README (about 4 minutes)
    python benchmarks/serve_load.py --seconds 5 --memory-requests 100   # a quick look

Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

PROMPTS = ["a red circle", "a blue square above a green triangle", "a yellow star", "a white ring to the left of "
           "an orange diamond", "a purple hexagon", "a pink circle below a brown square"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(*extra: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "reverie", "serve", "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                sys.exit(f"reverie serve exited: {proc.stderr.read().decode()}")
            try:
                if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit("reverie serve did not start within 120 s")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_request(client: httpx.Client, url: str, rng: random.Random, steps: int, kind: str = "txt2img"):
    """(ok, latency in s, what happened) of one request of ``kind``: txt2img, jobs (submit and poll) or bad."""
    body = {"prompt": rng.choice(PROMPTS), "seed": rng.randrange(2**32), "steps": steps, "batch_size": 1}
    t = time.perf_counter()
    try:
        if kind == "bad":
            body[rng.choice(["steps", "seed", "cfg_scale", "model"])] = rng.choice(["x", -5, 1e9, "../etc"])
            r = client.post(url + "/sdapi/v1/txt2img", json=body)
            return 400 <= r.status_code < 500, time.perf_counter() - t, r.status_code
        if kind == "jobs":
            job = client.post(url + "/v1/jobs/txt2img", json=body).json()
            while True:
                status = client.get(url + f"/v1/jobs/{job['id']}").json()
                if status["state"] not in ("queued", "running"):
                    return status["state"] == "done", time.perf_counter() - t, status["state"]
                time.sleep(0.05)
        r = client.post(url + "/sdapi/v1/txt2img", json=body)
        ok = r.status_code == 200 and len(r.json()["images"]) == 1
        return ok, time.perf_counter() - t, r.status_code
    except httpx.HTTPError as e:
        return False, time.perf_counter() - t, type(e).__name__


def run_clients(url: str, clients: int, seconds: float, steps: int, seed: int) -> dict:
    """``clients`` threads posting txt2img for ``seconds``."""
    results, lock = [], threading.Lock()
    stop = time.monotonic() + seconds

    def client_loop(k):
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(timeout=300) as client:
            while time.monotonic() < stop:
                res = one_request(client, url, rng, steps)
                with lock:
                    results.append(res)

    start = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    lat = sorted(r[1] for r in results if r[0])
    failed = [r[2] for r in results if not r[0]]
    return {"clients": clients, "requests": len(results), "failed": len(failed),
            "failures": sorted(set(map(str, failed))),
            "images_per_s": round(len(lat) / wall, 3), "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None, "wall_s": round(wall, 1)}


def memory_run(url: str, pid: int, total: int, clients: int, steps: int) -> dict:
    """``total`` requests from ``clients`` threads (10 % malformed, 10 % through /v1/jobs); RSS at each quarter."""
    with httpx.Client(timeout=300) as c:  # warm up: the allocator's pools, the first batch shapes
        for k in range(20):
            one_request(c, url, random.Random(k), steps)
    samples = [{"requests": 0, "rss_mb": round(rss_mb(pid), 1)}]
    counts = {"ok": 0, "failed": 0}
    done, lock = [0], threading.Lock()
    quarter = max(1, total // 4)

    def client_loop(k):
        rng = random.Random(10_000 + k)
        with httpx.Client(timeout=300) as client:
            while True:
                with lock:
                    if done[0] >= total:
                        return
                    done[0] += 1
                    n = done[0]
                kind = "bad" if n % 10 == 3 else "jobs" if n % 10 == 7 else "txt2img"
                ok, _, _ = one_request(client, url, rng, steps, kind)
                with lock:
                    counts["ok" if ok else "failed"] += 1
                    if n % quarter == 0:
                        samples.append({"requests": n, "rss_mb": round(rss_mb(pid), 1)})

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.0)
    samples.append({"requests": total, "rss_mb": round(rss_mb(pid), 1), "settled": True})
    return {"requests": total, "clients": clients, "steps": steps, **counts, "rss": samples,
            "growth_mb": round(samples[-1]["rss_mb"] - samples[0]["rss_mb"], 1)}


def batch_speedup(images: int, steps: int, repeats: int) -> dict:
    """In one process, alternating so that other load on the machine hits both alike: ``images`` one-image
    requests sampled as one batch (what the server does with requests of the same settings) against one at a
    time (``--no-batching``). Both through the same library call the worker makes."""
    import torch

    from reverie.cli.common import DEFAULT_MODEL
    from reverie.pipeline import Pipeline
    from reverie.sampling import SamplingOptions, sample_images

    pipe = Pipeline.from_pretrained(DEFAULT_MODEL)
    options = SamplingOptions(steps=steps)
    noise = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(k)) for k in range(images)]
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(images)]
    batched, alone = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        sample_images(pipe, images, options, prompts=prompts, noise=torch.cat(noise))
        batched.append(time.perf_counter() - t)
        t = time.perf_counter()
        for k in range(images):
            sample_images(pipe, 1, options, prompts=[prompts[k]], noise=noise[k])
        alone.append(time.perf_counter() - t)
    b, a = statistics.median(batched), statistics.median(alone)
    return {"images": images, "steps": steps, "repeats": repeats, "batched_s": round(b, 3), "one_by_one_s": round(a, 3),
            "speedup": round(a / b, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,8", help="comma-separated client counts")
    p.add_argument("--seconds", type=float, default=30.0, help="per client count and mode")
    p.add_argument("--steps", type=int, default=20, help="sampling steps per request (the model's default)")
    p.add_argument("--memory-requests", type=int, default=1000)
    p.add_argument("--memory-steps", type=int, default=4, help="steps in the memory run (many requests, quickly)")
    p.add_argument("--no-compare", action="store_true", help="skip the --no-batching server")
    p.add_argument("--speedup-repeats", type=int, default=5, help="alternating runs of the in-process batch timing")
    p.add_argument("-o", "--output", default="benchmarks/results/serve_load.json")
    args = p.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average at start "
                      f"{os.getloadavg()[0]:.1f}", "steps": args.steps, "seconds": args.seconds, "modes": {}}
    if args.speedup_repeats:
        out["batch_speedup"] = speed = batch_speedup(max(counts), args.steps, args.speedup_repeats)
        print(f"in process: {speed['images']} images of {speed['steps']} steps in one batch {speed['batched_s']} s, "
              f"one by one {speed['one_by_one_s']} s: batching {speed['speedup']}x faster", flush=True)
    modes = [("batching", ())] + ([] if args.no_compare else [("no batching", ("--no-batching",))])
    for name, extra in modes:
        with server(*extra) as (url, pid):
            rows = []
            for clients in counts:
                row = run_clients(url, clients, args.seconds, args.steps, seed=clients)
                rows.append(row)
                print(f"{name:12s} {clients:2d} clients: {row['images_per_s']:6.2f} images/s, p50 {row['p50_s']} s, "
                      f"p95 {row['p95_s']} s, {row['failed']} failed of {row['requests']}", flush=True)
            out["modes"][name] = rows
            if name == "batching" and args.memory_requests:
                mem = memory_run(url, pid, args.memory_requests, max(counts), args.memory_steps)
                out["memory"] = mem
                print(f"memory: {mem['rss'][0]['rss_mb']} MB before, {mem['rss'][-1]['rss_mb']} MB after "
                      f"{mem['requests']} requests ({mem['ok']} as expected, {mem['failed']} not); "
                      f"trace {[s['rss_mb'] for s in mem['rss']]}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
