"""A self-contained interactive 3-D view (one HTML file, no external script, no CDN, no WebGL needed).

Panels of coloured points (Gaussian centres, mesh surface samples, ground truth...) drawn side by side on 2-D
canvases by a small inline script: orthographic projection, painter's order, depth cueing. Drag to orbit (all
panels move together), wheel to zoom, double-click to resume the slow turntable. Point data are embedded as
base64 float32/uint8 arrays, so the file works offline, e.g. inside MLflow's artifact viewer.
"""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import numpy as np
import torch

from .preview import PointCloud

_SCRIPT = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("viewer-data").textContent);
  function bytes(b64) {
    var s = atob(b64), u = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
    return u;
  }
  var state = {yaw: 0.7, pitch: 0.35, zoom: 1.0, spin: true};
  var root = document.getElementById("viewer");
  var panels = DATA.panels.map(function (p) {
    var box = document.createElement("div");
    box.className = "panel";
    var title = document.createElement("div");
    title.className = "title";
    title.textContent = p.title + " (" + p.count + " points)";
    var canvas = document.createElement("canvas");
    canvas.width = DATA.size; canvas.height = DATA.size;
    box.appendChild(title); box.appendChild(canvas); root.appendChild(box);
    return {canvas: canvas, ctx: canvas.getContext("2d"), n: p.count,
            pos: new Float32Array(bytes(p.positions).buffer), col: bytes(p.colors),
            depth: new Float32Array(p.count), sx: new Float32Array(p.count), sy: new Float32Array(p.count),
            order: new Uint32Array(p.count)};
  });
  function draw(p) {
    var W = p.canvas.width, ctx = p.ctx, cy = Math.cos(state.yaw), sy = Math.sin(state.yaw);
    var cp = Math.cos(state.pitch), sp = Math.sin(state.pitch), scale = 0.5 * W / 0.62 * state.zoom;
    ctx.fillStyle = DATA.background; ctx.fillRect(0, 0, W, W);
    var i, x, y, z, xr, yr, dmin = 1e9, dmax = -1e9;
    for (i = 0; i < p.n; i++) {
      x = p.pos[3 * i]; y = p.pos[3 * i + 1]; z = p.pos[3 * i + 2];   // Z-up world
      xr = x * cy - y * sy; yr = x * sy + y * cy;                     // turn about z
      p.sx[i] = W / 2 + xr * scale;
      p.sy[i] = W / 2 - (z * cp - yr * sp) * scale;                   // tilt about the screen x axis
      p.depth[i] = z * sp + yr * cp;                                  // larger = farther from the viewer
      p.order[i] = i;
      if (p.depth[i] < dmin) dmin = p.depth[i];
      if (p.depth[i] > dmax) dmax = p.depth[i];
    }
    var d = p.depth;
    var idx = Array.prototype.slice.call(p.order).sort(function (a, b) { return d[b] - d[a]; });
    var r = Math.max(1.5, W / 240) * Math.sqrt(state.zoom), span = Math.max(dmax - dmin, 1e-6);
    for (var k = 0; k < idx.length; k++) {
      i = idx[k];
      var shade = 1.0 - 0.45 * (d[i] - dmin) / span;
      ctx.fillStyle = "rgb(" + Math.round(p.col[3 * i] * shade) + "," + Math.round(p.col[3 * i + 1] * shade) +
                      "," + Math.round(p.col[3 * i + 2] * shade) + ")";
      ctx.fillRect(p.sx[i] - r, p.sy[i] - r, 2 * r, 2 * r);
    }
  }
  function drawAll() { panels.forEach(draw); }
  var drag = null;
  panels.forEach(function (p) {
    p.canvas.addEventListener("pointerdown", function (e) {
      drag = {x: e.clientX, y: e.clientY}; state.spin = false; p.canvas.setPointerCapture(e.pointerId);
    });
    p.canvas.addEventListener("pointermove", function (e) {
      if (!drag) return;
      state.yaw += (e.clientX - drag.x) * 0.01;
      state.pitch = Math.max(-1.5, Math.min(1.5, state.pitch + (e.clientY - drag.y) * 0.01));
      drag = {x: e.clientX, y: e.clientY}; drawAll();
    });
    p.canvas.addEventListener("pointerup", function () { drag = null; });
    p.canvas.addEventListener("wheel", function (e) {
      e.preventDefault(); state.zoom = Math.max(0.3, Math.min(6, state.zoom * Math.exp(-e.deltaY * 0.001)));
      drawAll();
    }, {passive: false});
    p.canvas.addEventListener("dblclick", function () { state.spin = true; });
  });
  var last = null;
  function tick(t) {
    if (state.spin && last !== null) { state.yaw += (t - last) * 0.0004; drawAll(); }
    last = t; window.requestAnimationFrame(tick);
  }
  drawAll();
  window.requestAnimationFrame(tick);
  document.body.setAttribute("data-viewer-ready", String(panels.length));
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 8px; background: #fafafa; color: #222; }}
#viewer {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.panel {{ border: 1px solid #ccc; background: #fff; }}
.title {{ font-size: 13px; padding: 3px 6px; border-bottom: 1px solid #eee; }}
canvas {{ display: block; cursor: grab; touch-action: none; }}
.hint {{ font-size: 12px; color: #666; margin: 4px 0 8px; }}
</style></head>
<body><h3>{title}</h3><div class="hint">drag: orbit · wheel: zoom · double-click: turntable</div>
<div id="viewer"></div>
<script type="application/json" id="viewer-data">{data}</script>
<script>{script}</script>
</body></html>
"""


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def write_orbit_viewer(path: str | os.PathLike, panels: list[PointCloud], title: str = "3-D preview",
                       max_points: int = 30000, size: int = 360, seed: int = 0) -> Path:
    """Write the viewer for `panels` (each subsampled to at most `max_points`); returns the path."""
    g = torch.Generator().manual_seed(seed)
    entries = []
    for p in panels:
        pts, col = p.points.detach().float().cpu(), p.colors.detach().float().cpu()
        if pts.shape[0] > max_points:
            keep = torch.randperm(pts.shape[0], generator=g)[:max_points]
            pts, col = pts[keep], col[keep]
        entries.append({"title": str(p.title), "count": int(pts.shape[0]),
                        "positions": _b64(pts.numpy().astype("<f4")),
                        "colors": _b64((col.clamp(0, 1) * 255).round().to(torch.uint8).numpy())})
    data = json.dumps({"size": int(size), "background": "#f5f5f5", "panels": entries})
    data = data.replace("<", "\\u003c")  # the JSON block can never close its <script> element
    page = _PAGE.format(title=html.escape(title), data=data, script=_SCRIPT)
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
