/* The results browser of `pipeline browse` (pipeline/browse.py writes the data; this file is copied
   verbatim into every site).

   Data arrives in <script src> files that call BROWSE.index({...}) and BROWSE.page(n, {...}):
   Chromium refuses fetch() and XHR of local files under file://, but loads scripts. The index holds
   what sorting, filtering and paging need (ids, captions, scores, reference words); a page file
   holds the references, attention maps and objects of `page_size` images and is loaded when a card
   of it is shown. No libraries, no network.

   Attention maps are uint8, one byte per region, base64'd per caption (T x L bytes). smooth()
   is viz.upsample_alpha: nearest upsampling x upscale, separable gaussian (sigma = upscale / 2 px,
   edge padding), rescaled to [0, 1]; drawn in gray at opacity 0.7 over the image. */
"use strict";
(function () {
  const B = (window.BROWSE = {playMs: 700, ready: false, readyMs: null});
  const METRIC_NAMES = {CIDEr: "CIDEr", Bleu_4: "BLEU-4", Bleu_1: "BLEU-1", METEOR: "METEOR", ROUGE_L: "ROUGE-L"};
  let IX = null;                         // the index
  const pageData = new Map();            // page number -> page data
  const pending = new Map();             // page number -> {promise, resolve, reject}
  const state = {sort: "", dir: "asc", q: "", refs: false, page: 1, boxes: false, g: ""};
  // the gender-word filter (pipeline/inference/diagnostics.py): "" all images, "any" those whose references
  // agree on a gender, else the verdict of a run's caption (either run's, in a comparison)
  const GENDER = [["", "all images"], ["any", "references agree on a gender"], ["wrong", "names the other gender"],
                  ["mixed", "names both genders"], ["neutral", "a neutral word (person, child, …)"],
                  ["none", "no person word"], ["right", "names the same gender"]];
  let view = [];                         // site indices after filtering and sorting
  let generation = 0;                    // bumps on every render: late page data for an old view is dropped
  let capWords = null, refWords = null;  // per image: Set of caption words (any run), of reference words
  const panels = [];                     // live panels of the rendered page

  const $ = (sel, root) => (root || document).querySelector(sel);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const pad = (n, w) => String(n).padStart(w, "0");
  const fmt = (v) => (v === null || v === undefined ? "–" : v.toFixed(2));

  function fail(msg) {
    const box = $("#error");
    box.hidden = false;
    box.appendChild(el("div", "", msg));
  }
  B.missing = (src) => fail(`${src} could not be loaded: this folder is not a complete site written by ` +
                            "`pipeline browse` (write it again).");

  // -- attention maps -----------------------------------------------------------------------------
  const kernels = new Map();
  function kernel(sigma) {               // viz._gaussian_kernel
    if (!kernels.has(sigma)) {
      const r = Math.max(1, Math.round(3 * sigma));
      const k = new Float64Array(2 * r + 1);
      let s = 0;
      for (let i = -r; i <= r; i++) { k[i + r] = Math.exp(-0.5 * (i / sigma) ** 2); s += k[i + r]; }
      for (let i = 0; i < k.length; i++) k[i] /= s;
      kernels.set(sigma, k);
    }
    return kernels.get(sigma);
  }

  /* (gh*gw) map (bytes of `q` from `off`) -> Float32Array (gh*up x gw*up) in [0, 1], like viz.upsample_alpha. */
  function smooth(q, off, gh, gw, up) {
    const H = gh * up, W = gw * up, k = kernel(up / 2), r = (k.length - 1) >> 1;
    const clampCell = (p, n, size) => Math.min(n - 1, Math.floor(Math.min(size - 1, Math.max(0, p)) / up));
    const V = new Float64Array(H * gw);  // vertical pass: the image is constant within a cell column
    for (let y = 0; y < H; y++) {
      for (let j = 0; j < k.length; j++) {
        const row = clampCell(y + j - r, gh, H) * gw, kj = k[j];
        for (let cx = 0; cx < gw; cx++) V[y * gw + cx] += kj * q[off + row + cx];
      }
    }
    const xcell = new Int32Array(W + 2 * r);   // cell column of each padded x
    for (let x = 0; x < W + 2 * r; x++) xcell[x] = clampCell(x - r, gw, W);
    const out = new Float32Array(H * W);
    let lo = Infinity, hi = -Infinity;
    for (let y = 0; y < H; y++) {
      const vy = y * gw;
      for (let x = 0; x < W; x++) {
        let s = 0;
        for (let j = 0; j < k.length; j++) s += k[j] * V[vy + xcell[x + j]];
        out[y * W + x] = s;
        if (s < lo) lo = s;
        if (s > hi) hi = s;
      }
    }
    for (let i = 0; i < out.length; i++) out[i] = hi > lo ? (out[i] - lo) / (hi - lo) : 0;
    return out;
  }
  B.smooth = (bytes, gh, gw, up) => Array.from(smooth(Uint8Array.from(bytes), 0, gh, gw, up));

  function decodeMaps(b64) {
    const s = atob(b64), q = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) q[i] = s.charCodeAt(i);
    return q;
  }

  function drawMap(canvas, q, t, grid, up = IX.upscale) {
    const [gh, gw] = grid, L = gh * gw;
    const m = smooth(q, t * L, gh, gw, up);
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(gw * up, gh * up);
    for (let i = 0; i < m.length; i++) {
      const v = Math.round(255 * m[i]);
      img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = v;
      img.data[4 * i + 3] = 179;         // opacity 0.7, as the caption PNGs
    }
    ctx.putImageData(img, 0, 0);
  }
  // The overlay, shared with the captioning page of `pipeline serve` (pipeline/serving/assets/serve.js),
  // which loads this file for it: decodeMaps(base64) -> bytes; drawMap(canvas, bytes, word t, [gh, gw], upscale).
  B.overlay = {decodeMaps, drawMap, smooth};

  // -- data files -------------------------------------------------------------------------------
  B.index = function (data) {
    IX = data;
    try { boot(); } catch (e) { fail(`could not start: ${e}`); throw e; }
  };

  B.page = function (n, data) {
    pageData.set(n, data);
    const p = pending.get(n);
    if (p) p.resolve(data);
  };

  function loadPage(n) {
    if (pageData.has(n)) return Promise.resolve(pageData.get(n));
    if (pending.has(n)) return pending.get(n).promise;
    const p = {};
    p.promise = new Promise((resolve, reject) => { p.resolve = resolve; p.reject = reject; });
    pending.set(n, p);
    const s = document.createElement("script");
    s.src = `data/page_${pad(n, 4)}.js`;
    s.charset = "utf-8";
    s.onerror = () => {
      pending.delete(n);
      fail(`${s.src.split("/").slice(-2).join("/")} could not be loaded: the site is incomplete (write it again).`);
      p.reject(new Error(s.src));
    };
    document.head.appendChild(s);
    return p.promise;
  }

  // -- view: filter, sort, page -------------------------------------------------------------------
  const runs = () => IX.runs.length;

  function sortValue(key, i) {
    const [what, who] = key.split(":");
    if (what === "id") return IX.images.id[i];
    if (what === "len") return IX.images.caption[+who][i] ? IX.images.caption[+who][i].split(" ").length : 0;
    const col = (r) => IX.images.score[r][what];
    if (who === "d") {
      const a = col(0) ? col(0)[i] : null, b = col(1) ? col(1)[i] : null;
      return a === null || b === null ? null : b - a;
    }
    return col(+who) ? col(+who)[i] : null;
  }

  function computeView() {
    const n = IX.count;
    // the words as text.tokenize makes them: lowercase, apostrophes dropped, split at anything else
    const words = state.q.toLowerCase().replace(/['\u2019]/g, "").split(/[^\p{L}\p{N}]+/u).filter(Boolean);
    let idx = [];
    for (let i = 0; i < n; i++) {
      if (words.length && !words.every((w) => capWords[i].has(w) || (state.refs && refSet(i).has(w)))) continue;
      if (state.g && !genderMatch(i)) continue;
      idx.push(i);
    }
    const key = state.sort, sign = state.dir === "desc" ? -1 : 1;
    const vals = new Map(idx.map((i) => [i, sortValue(key, i)]));
    idx.sort((a, b) => {
      const va = vals.get(a), vb = vals.get(b);
      if (va === null && vb === null) return a - b;
      if (va === null) return 1;          // unscored last in both directions
      if (vb === null) return -1;
      if (va < vb) return -sign;
      if (va > vb) return sign;
      return a - b;
    });
    view = idx;
  }

  function genderMatch(i) {
    const G = IX.images.gender;
    if (!G || !G.ref[i]) return false;
    return state.g === "any" || G.verdict.some((v) => v[i] === state.g);
  }

  function refSet(i) {
    if (!refWords[i]) refWords[i] = new Set(IX.images.refwords[i].split(" ").filter(Boolean));
    return refWords[i];
  }

  const pageCount = () => Math.max(1, Math.ceil(view.length / IX.page_size));

  function saveHash() {
    const p = new URLSearchParams();
    p.set("sort", state.sort);
    p.set("dir", state.dir);
    if (state.q) p.set("q", state.q);
    if (state.refs) p.set("refs", "1");
    if (state.boxes) p.set("boxes", "1");
    if (state.g) p.set("g", state.g);
    if (state.page > 1) p.set("p", String(state.page));
    try { history.replaceState(null, "", "#" + p.toString()); } catch (e) { /* some file:// setups refuse */ }
  }

  function readHash(sortKeys) {
    const p = new URLSearchParams(location.hash.slice(1));
    if (p.has("sort") && sortKeys.includes(p.get("sort"))) state.sort = p.get("sort");
    if (["asc", "desc"].includes(p.get("dir"))) state.dir = p.get("dir");
    state.q = p.get("q") || "";
    state.refs = p.get("refs") === "1";
    state.boxes = p.get("boxes") === "1" && IX.has_objects;
    state.g = IX.images.gender && GENDER.some(([v]) => v === p.get("g")) ? p.get("g") : "";
    state.page = Math.max(1, parseInt(p.get("p") || "1", 10) || 1);
    if (p.has("ms")) B.playMs = Math.max(10, parseInt(p.get("ms"), 10) || B.playMs);
  }

  // -- header and controls ----------------------------------------------------------------------
  function sortOptions() {
    const opts = [];
    for (const m of IX.metrics) {
      if (runs() === 2) opts.push([`${m}:d`, `${METRIC_NAMES[m] || m}: ${IX.runs[1].label} − ${IX.runs[0].label}`]);
      IX.runs.forEach((r, k) => opts.push([`${m}:${k}`, `${METRIC_NAMES[m] || m}` + (runs() === 2 ? ` (${r.label})` : "")]));
    }
    IX.runs.forEach((r, k) => opts.push([`len:${k}`, "caption length" + (runs() === 2 ? ` (${r.label})` : "")]));
    opts.push(["id", "image id"]);
    return opts;
  }

  function header() {
    document.title = IX.title;
    $("#title").textContent = IX.title;
    const sum = $("#summary");
    IX.runs.forEach((r, k) => {
      const line = el("div", `run run${k}`);
      line.appendChild(el("b", "", r.label));
      const inf = r.info || {};
      const bits = [];
      if (inf.checkpoint) bits.push(`${inf.checkpoint}.pt` + (inf.epoch !== null && inf.epoch !== undefined ? ` (epoch ${inf.epoch})` : ""));
      if (inf.beam) bits.push(`beam ${inf.beam}` + (inf.length_norm ? `, length norm ${inf.length_norm}` : ""));
      if (inf.results_file) bits.push(`scored by pipeline score: ${inf.results_file.split("/").pop()}`);
      const corpus = IX.metrics.filter((m) => r.corpus[m] !== undefined && r.corpus[m] !== null)
        .map((m) => `${METRIC_NAMES[m] || m} ${fmt(r.corpus[m])}`);
      if (corpus.length) bits.push(`${IX.split}, ${inf.scored ?? IX.count} images: ${corpus.join(" · ")}`);
      line.appendChild(document.createTextNode(" " + bits.join("; ")));
      if (inf.run) line.title = `${inf.run}\nfeatures: ${inf.features || ""}`;
      sum.appendChild(line);
      if (r.diagnostics) sum.appendChild(el("div", `diag run${k}`, diagText(r.diagnostics)));
    });
    for (const n of IX.notes || []) $("#notes").appendChild(el("li", "", n));
    const [gh, gw] = IX.grid, up = IX.upscale;
    $("#foot").textContent = `Hover or click a word to see where the model looked when it said it; ▶ plays the ` +
      `caption word by word. Attention: the ${gh}×${gw} map upsampled ×${up} and smoothed (gaussian, σ ${up / 2} px), ` +
      `bright where attended. Scores ×100, per image (pycocoevalcap). ${IX.count} images; ${IX.generator}, ${IX.created}.`;

    const keys = sortOptions();
    const sel = $("#sort");
    for (const [v, label] of keys) sel.appendChild(new Option(label, v));
    state.sort = IX.sort && keys.some(([v]) => v === IX.sort.key) ? IX.sort.key : keys[0][0];
    state.dir = (IX.sort && IX.sort.dir) || "asc";
    readHash(keys.map(([v]) => v));
    sel.value = state.sort;
    $("#dir").value = state.dir;
    $("#filter").value = state.q;
    $("#inrefs").checked = state.refs;
    $("#boxes-label").hidden = !IX.has_objects;
    $("#boxes").checked = state.boxes;
    document.body.classList.toggle("show-boxes", state.boxes);
    document.body.classList.toggle("compare", runs() === 2);

    const refresh = (resetPage) => { if (resetPage) state.page = 1; computeView(); render(); };
    sel.addEventListener("change", () => { state.sort = sel.value; refresh(true); });
    $("#dir").addEventListener("change", (e) => { state.dir = e.target.value; refresh(true); });
    let timer = null;
    $("#filter").addEventListener("input", (e) => {
      clearTimeout(timer);
      timer = setTimeout(() => { state.q = e.target.value.trim(); refresh(true); }, 120);
    });
    $("#inrefs").addEventListener("change", (e) => { state.refs = e.target.checked; if (state.q) refresh(true); else saveHash(); });
    const gsel = $("#gender");
    $("#gender-label").hidden = !IX.images.gender;
    for (const [v, label] of GENDER) gsel.appendChild(new Option(label, v));
    gsel.value = state.g;
    gsel.addEventListener("change", () => { state.g = gsel.value; refresh(true); });
    $("#boxes").addEventListener("change", (e) => {
      state.boxes = e.target.checked;
      document.body.classList.toggle("show-boxes", state.boxes);
      saveHash();
    });
  }

  /* One line of what the captions of a run are like: diversity, and the gender-word diagnostic. */
  function diagText(d) {
    const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
    const num = (x, n) => (x === null || x === undefined ? "–" : x.toFixed(n));
    const v = d.diversity, g = d.gender;
    let t = `vocabulary ${v.vocab_size} words · ` + (v.novel === null ? "" : `${pct(v.novel)} not a training caption · `) +
            `distinct-1 ${num(v.distinct_1, 3)} · distinct-2 ${num(v.distinct_2, 3)} · mean length ${num(v.mean_length, 1)}`;
    if (g.images) t += ` · gender words (${g.images} images whose references agree): other gender ` +
                       `${pct(g.shares.other)} (${g.counts.other}), neutral ${pct(g.shares.neutral)} (${g.counts.neutral})`;
    return t;
  }

  function pager() {
    const n = pageCount();
    for (const nav of document.querySelectorAll(".pager")) {
      nav.textContent = "";
      const btn = (label, page, cls) => {
        const b = el("button", cls, label);
        b.disabled = page < 1 || page > n || page === state.page;
        b.addEventListener("click", () => goto(page));
        nav.appendChild(b);
      };
      btn("« first", 1, "first");
      btn("‹ prev", state.page - 1, "prev");
      const inp = el("input", "pageno");
      inp.type = "number"; inp.min = 1; inp.max = n; inp.value = state.page;
      inp.setAttribute("aria-label", "page");
      inp.addEventListener("change", () => goto(Math.min(n, Math.max(1, parseInt(inp.value, 10) || 1))));
      const lab = el("span", "pages");
      lab.append("page ", inp, ` of ${n}`);
      nav.appendChild(lab);
      btn("next ›", state.page + 1, "next");
      btn("last »", n, "last");
    }
  }

  function goto(page) {
    state.page = page;
    render();
    window.scrollTo(0, 0);
  }

  // -- cards ------------------------------------------------------------------------------------
  function render() {
    const gen = ++generation;
    for (const p of panels) stopPlay(p);
    panels.length = 0;
    const n = pageCount();
    if (state.page > n) state.page = n;
    const ps = IX.page_size, from = (state.page - 1) * ps, shown = view.slice(from, from + ps);
    $("#count").textContent = `${view.length} of ${IX.count} images` +
      (view.length ? `, ${from + 1}–${from + shown.length} shown` : "");
    pager();
    saveHash();
    const main = $("#cards");
    main.textContent = "";
    if (!shown.length) {
      main.appendChild(el("p", "empty", state.g && !state.q ? "No image matches the gender filter." :
        state.q ? `No image has the word “${state.q}”` +
        (state.refs ? " in its captions." : " in its generated caption(s); tick “in references too” to search those.") :
        "No images."));
    }
    const byPage = new Map();
    shown.forEach((i, k) => {
      const card = makeCard(i, from + k + 1);
      main.appendChild(card.node);
      const p = Math.floor(i / ps) + 1;
      if (!byPage.has(p)) byPage.set(p, []);
      byPage.get(p).push(card);
    });
    for (const [p, cards] of byPage) {
      loadPage(p).then((data) => {
        if (gen !== generation) return;
        for (const c of cards) fillCard(c, data);
      }, () => {});
    }
    if (!B.ready) { B.ready = true; B.readyMs = performance.now(); }
  }

  function scoreLine(r, i) {
    const div = el("div", "scores");
    const [what, who] = state.sort.split(":");
    for (const m of IX.metrics) {
      const v = IX.images.score[r][m] ? IX.images.score[r][m][i] : null;
      const s = el("span", "metric" + (m === what && (who === String(r) || who === "d") ? " key" : ""),
                   `${METRIC_NAMES[m] || m} ${fmt(v)}`);
      div.appendChild(s);
    }
    return div;
  }

  function makeCard(i, rank) {
    const node = el("article", "card");
    node.dataset.i = i;
    node.dataset.id = IX.images.id[i];
    const head = el("div", "head");
    head.appendChild(el("span", "rank", `#${rank}`));
    head.appendChild(el("span", "imgid", IX.images.id[i]));
    if (runs() === 2) {
      const m = IX.metrics.includes(state.sort.split(":")[0]) ? state.sort.split(":")[0] : IX.metrics[0];
      if (m) {
        const d = sortValue(`${m}:d`, i);
        const s = el("span", "delta" + (d === null ? "" : d > 0 ? " up" : d < 0 ? " down" : ""),
                     `Δ ${METRIC_NAMES[m] || m} ${d === null ? "–" : (d > 0 ? "+" : "") + d.toFixed(2)}`);
        s.title = `${IX.runs[1].label} − ${IX.runs[0].label}`;
        head.appendChild(s);
      }
    }
    node.appendChild(head);
    const row = el("div", "panels");
    const card = {node, i, panels: []};
    const missing = IX.images.missing.includes(i);
    IX.runs.forEach((r, k) => {
      const panel = el("div", `panel run${k}`);
      if (runs() === 2) panel.appendChild(el("div", "label", r.label));
      const frame = el("div", "frame");
      const img = el("img");
      img.src = missing ? "img/missing.jpg" : `img/${pad(i, 6)}.jpg`;
      img.width = IX.images.w[i];
      img.height = IX.images.h[i];
      img.alt = IX.images.id[i];
      const grid = r.grid || IX.grid;      // runs of a comparison may have different grids
      const canvas = el("canvas", "att");
      canvas.width = grid[1] * IX.upscale;
      canvas.height = grid[0] * IX.upscale;
      const boxes = el("div", "boxes");
      frame.style.width = `${IX.images.w[i]}px`;
      frame.append(img, canvas, boxes);
      panel.appendChild(frame);
      const cap = el("div", "caption");
      const play = el("button", "play", "▶");
      play.title = "play: show the attention of each word in turn";
      cap.appendChild(play);
      const words = IX.images.caption[k][i] ? IX.images.caption[k][i].split(" ") : [];
      const spans = words.map((w, t) => {
        const s = el("span", "w", w);
        s.dataset.t = t;
        s.tabIndex = 0;
        cap.append(s, " ");
        return s;
      });
      if (!words.length) cap.appendChild(el("span", "nocap", "(empty caption)"));
      panel.appendChild(cap);
      const info = el("div", "wordinfo", " ");
      panel.appendChild(info);
      panel.appendChild(scoreLine(k, i));
      const G = IX.images.gender;
      if (G && G.ref[i]) {
        const g = el("div", `gender ${G.verdict[k][i]}`, `gender: ${G.verdict[k][i]} (the references say ${G.ref[i]})`);
        g.title = "pipeline/inference/diagnostics.py: at least 3 references name this gender and none the other";
        panel.appendChild(g);
      }
      row.appendChild(panel);
      const P = {card, r: k, i, grid, frame, canvas, boxes, spans, info, play, maps: null, named: null, inbox: null,
                 objects: null, pinned: null, hover: null, playing: null, timer: null};
      spans.forEach((s, t) => {
        s.addEventListener("mouseenter", () => { P.hover = t; update(P); });
        s.addEventListener("mouseleave", () => { P.hover = null; update(P); });
        s.addEventListener("click", () => { stopPlay(P); P.pinned = P.pinned === t ? null : t; update(P); });
        s.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); s.click(); } });
      });
      play.addEventListener("click", () => (P.timer !== null ? stopPlay(P) : startPlay(P)));
      card.panels.push(P);
      panels.push(P);
    });
    node.appendChild(row);
    const refs = el("ol", "refs");
    refs.appendChild(el("li", "loading", "references…"));
    node.appendChild(refs);
    card.refs = refs;
    return card;
  }

  function fillCard(card, data) {
    const j = card.i - data.start;
    card.refs.textContent = "";
    const refs = data.refs[j] || [];
    if (!refs.length) card.refs.appendChild(el("li", "loading", "(no reference captions)"));
    for (const c of refs) card.refs.appendChild(el("li", "", c));
    for (const P of card.panels) {
      const rd = data.runs[P.r];
      P.maps = decodeMaps(rd.maps[j]);
      P.named = rd.named ? rd.named[j] : null;
      P.inbox = rd.inbox ? rd.inbox[j] : null;
      P.img = rd.img ? rd.img[j] : null;   // decoders with the visual sentinel: each word's share from the image
      P.objects = data.objects ? data.objects[j] : null;
      if (P.objects && IX.frame) drawBoxes(P);
      update(P);
    }
  }

  function drawBoxes(P) {
    const [H, W] = IX.frame;
    P.boxes.textContent = "";
    P.objects.forEach((o, k) => {
      const [x0, y0, x1, y1] = o.box;
      const b = el("div", "box");
      b.dataset.k = k;
      Object.assign(b.style, {left: `${100 * x0 / W}%`, top: `${100 * y0 / H}%`,
                              width: `${100 * (x1 - x0) / W}%`, height: `${100 * (y1 - y0) / H}%`});
      b.appendChild(el("span", "boxlabel", `${o.color} ${o.shape}`));
      P.boxes.appendChild(b);
    });
  }

  function update(P) {
    const t = P.playing ?? P.hover ?? P.pinned;
    P.spans.forEach((s, k) => {
      s.classList.toggle("active", k === t);
      s.classList.toggle("pinned", k === P.pinned);
    });
    const named = t !== null && P.named ? P.named[t] || [] : [];
    for (const b of P.boxes.children) b.classList.toggle("named", named.includes(+b.dataset.k));
    if (t === null || !P.maps) {
      P.canvas.classList.remove("on");
      P.info.textContent = t === null ? " " : "loading…";
      return;
    }
    drawMap(P.canvas, P.maps, t, P.grid);
    P.canvas.classList.add("on");
    const w = P.spans[t].textContent;
    let text = `“${w}”, word ${t + 1} of ${P.spans.length}`;
    const ib = P.inbox ? P.inbox[t] : null;
    if (ib) text += `: ${(100 * ib[0]).toFixed(0)}% of its attention in the named box${named.length > 1 ? "es" : ""} ` +
                    `(${(100 * ib[1]).toFixed(0)}% of the image)`;
    if (P.img) text += ` · ${(100 * P.img[t]).toFixed(0)}% from the image (the rest from the LSTM's memory)`;
    P.info.textContent = text;
  }

  function startPlay(P) {
    if (!P.spans.length) return;
    for (const Q of P.card.panels) if (Q !== P) stopPlay(Q);
    P.playing = 0;
    P.play.textContent = "■";
    P.play.classList.add("playing");
    update(P);
    P.timer = setInterval(() => {
      if (P.playing + 1 >= P.spans.length) { stopPlay(P); return; }
      P.playing += 1;
      update(P);
    }, B.playMs);
  }

  function stopPlay(P) {
    if (P.timer !== null) clearInterval(P.timer);
    P.timer = null;
    P.playing = null;
    P.play.textContent = "▶";
    P.play.classList.remove("playing");
    update(P);
  }

  function boot() {
    if (!IX || IX.format !== 1) throw new Error(`unknown data format ${IX && IX.format}`);
    capWords = IX.images.id.map((_, i) => new Set(IX.images.caption.flatMap((c) => (c[i] ? c[i].split(" ") : []))));
    refWords = new Array(IX.count);
    header();
    computeView();
    render();
  }
})();
