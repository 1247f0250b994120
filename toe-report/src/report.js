// TOE report: interactive icicle flamegraphs (search, click to zoom) drawn from the tree data the
// report embeds. Plain DOM, no dependencies, so the report stays one self-contained file.
"use strict";
window.toeErrors = [];
window.addEventListener("error", (e) => {
  window.toeErrors.push(String(e.message));
  document.body.dataset.jsErrors = String(window.toeErrors.length);
});

const ROW = 18;
const MIN_WIDTH = 0.0005; // of the zoomed frame: narrower frames are not drawn

function hue(name) {
  let h = 0;
  for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
  return h;
}

function colour(name) {
  const h = hue(name);
  if (name.endsWith("_[k]")) return `hsl(${20 + (h % 20)}, 85%, ${60 + (h % 10)}%)`;
  if (name.endsWith("_[i]")) return `hsl(${190 + (h % 30)}, 55%, ${70 + (h % 10)}%)`;
  return `hsl(${(h % 50)}, 80%, ${55 + (h % 15)}%)`;
}

// Tree nodes arrive as [nameIndex, value, [children]]; build objects with parents and offsets.
function build(names, raw, parent, depth) {
  const node = { name: names[raw[0]], value: raw[1], parent, depth, children: [] };
  for (const c of raw[2] || []) node.children.push(build(names, c, node, depth + 1));
  return node;
}

class Flame {
  constructor(root) {
    this.root = root;
    this.el = root.querySelector(".flame-frames");
    this.status = root.querySelector(".flame-status");
    this.unit = root.dataset.unit;
    const data = JSON.parse(root.querySelector("script[type='application/json']").textContent);
    this.tree = build(data.names, data.tree, null, 0);
    this.hidden = data.hidden;
    this.zoomed = this.tree;
    this.term = "";
    root.querySelector(".flame-search").addEventListener("input", (e) => this.search(e.target.value));
    root.querySelector(".flame-reset").addEventListener("click", () => { this.zoomed = this.tree; this.draw(); });
    this.draw();
  }

  matches(node) {
    return this.term !== "" && node.name.toLowerCase().includes(this.term);
  }

  draw() {
    const frag = document.createDocumentFragment();
    const z = this.zoomed;
    const total = this.tree.value;
    let depth = 0;
    // Ancestors of the zoomed frame span the full width, so the path stays visible.
    for (let a = z.parent, row = z.depth - 1; a; a = a.parent, row--) {
      frag.appendChild(this.frame(a, 0, 1, row, total));
    }
    const walk = (node, left, width) => {
      depth = Math.max(depth, node.depth);
      frag.appendChild(this.frame(node, left, width, node.depth, total));
      let x = left;
      for (const c of node.children) {
        const w = (width * c.value) / node.value;
        if (w >= MIN_WIDTH) walk(c, x, w);
        x += w;
      }
    };
    walk(z, 0, 1);
    this.el.replaceChildren(frag);
    this.el.style.height = `${(depth + 1) * ROW}px`;
    this.report();
  }

  frame(node, left, width, row, total) {
    const d = document.createElement("div");
    d.className = "frame" + (this.matches(node) ? " match" : "");
    d.style.left = `${left * 100}%`;
    d.style.width = `${width * 100}%`;
    d.style.top = `${row * ROW}px`;
    if (!this.matches(node)) d.style.background = colour(node.name);
    const pct = ((100 * node.value) / total).toFixed(2);
    d.title = `${node.name}\n${node.value.toLocaleString()} ${this.unit} (${pct}%)`;
    d.textContent = node.name;
    d.addEventListener("click", () => { this.zoomed = node; this.draw(); });
    return d;
  }

  search(term) {
    this.term = term.trim().toLowerCase();
    this.draw();
  }

  // The share under matching frames, each sample counted once (outermost match only).
  report() {
    if (this.term === "") {
      this.status.textContent = this.hidden > 0
        ? `${this.hidden.toLocaleString()} frames below 0.02% are not drawn`
        : "";
      return;
    }
    let matched = 0;
    let frames = 0;
    const walk = (node) => {
      if (this.matches(node)) { matched += node.value; frames++; return; }
      for (const c of node.children) walk(c);
    };
    walk(this.tree);
    const pct = ((100 * matched) / this.tree.value).toFixed(1);
    this.status.textContent = `matched: ${pct}% of ${this.unit} in ${frames} frame(s)`;
    this.status.dataset.matched = pct;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const flames = [...document.querySelectorAll(".flame")].map((f) => new Flame(f));
  // #search=term searches every flamegraph at load: links from findings, and headless checks.
  const m = /search=([^&]+)/.exec(location.hash);
  if (m) {
    const term = decodeURIComponent(m[1]);
    for (const f of flames) {
      f.root.querySelector(".flame-search").value = term;
      f.search(term);
    }
  }
  document.body.dataset.ready = "1";
});
