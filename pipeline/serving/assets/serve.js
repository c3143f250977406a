/* The captioning page of `pipeline serve` (pipeline/serving/server.py).

   A photo picked or dropped is checked here (empty, too large), sent as base64 JSON to POST api/caption,
   and shown with its caption, every final beam with its log-probability, and, for the word under the
   pointer (or clicked), the attention overlay of the results browser: BROWSE.overlay from
   browse/app.js (pipeline/reporting/browse_assets/app.js), not a copy of it. Any refusal is one
   message in #message; the page and the server keep going. window.SERVE exposes the state for tests. */
"use strict";
(function () {
  const S = (window.SERVE = {ready: false, busy: false, lastMs: null, result: null, shown: 0, message: ""});
  const UP = 16;                              // overlay upsampling, as the results browser's default
  const $ = (sel) => document.querySelector(sel);
  let info = null, beam = null, maps = null, pinned = null, hover = null, objectUrl = null, seq = 0;

  function show(msg, kind) {
    const m = $("#message");
    m.textContent = msg || "";
    m.className = kind || "";
    m.hidden = !msg;
    S.message = msg || "";
  }

  async function loadInfo() {
    try {
      const r = await fetch("api/model");
      info = await r.json();
    } catch (e) {
      show(`Could not reach the server (${e}). Is \`pipeline serve\` still running?`);
      return;
    }
    const parts = info.members.map((m) => {
      const v = m.val ? ` — val CIDEr ${(100 * m.val.CIDEr).toFixed(1)}, BLEU-4 ${(100 * m.val.Bleu_4).toFixed(1)}` : "";
      return `${m.kind} ${m.name} (${m.backbones.join(" + ")})${v}`;
    });
    $("#model").textContent = (info.members.length > 1 ? "ensemble: " : "") + parts.join("; ") + `; beam ${info.beam}`;
    $("#limit").textContent = info.max_upload_mb;
    S.ready = true;
  }

  function pick(files) {
    if (!files || !files.length) return;
    const note = files.length > 1 ? `One photo at a time: ${files.length} files were given, so only the first ` +
                                    `(${files[0].name}) is captioned.` : "";
    upload(files[0], note);
  }

  function toBase64(file) {
    return new Promise((resolve, reject) => {
      const fr = new FileReader();
      fr.onload = () => resolve(String(fr.result).slice(String(fr.result).indexOf(",") + 1));
      fr.onerror = () => reject(fr.error);
      fr.readAsDataURL(file);
    });
  }

  function messageOf(status, body, name) {
    const d = body && body.detail;
    if (typeof d === "string" && d) return d;
    if (status === 413) return `${name}: the photo is over the ${info ? info.max_upload_mb : 20} MB limit of this page.`;
    if (status === 503) return "The server is busy with other photos; try again in a few seconds.";
    if (status === 504) return `${name}: no caption within the server's time limit (it is busy); try again.`;
    if (status === 422) return `${name}: the upload was not understood by the server; pick the file again.`;
    return `${name}: the server could not caption this photo (HTTP ${status}); see the terminal running ` +
           "`pipeline serve`. It keeps serving: try another photo.";
  }

  async function upload(file, note) {
    const limit = (info ? info.max_upload_mb : 20) * 1e6;
    const my = ++seq;
    if (file.size === 0) return fail(my, `${file.name}: the file is empty (0 bytes). Pick a photo (JPEG or PNG).`);
    if (file.size > limit) {
      return fail(my, `${file.name}: ${(file.size / 1e6).toFixed(1)} MB is over the ${limit / 1e6} MB limit of this ` +
                      "page. Pick a smaller photo (or downscale it).");
    }
    S.busy = true;
    show(note, "note");
    $("#status").textContent = `captioning ${file.name}…`;
    const t0 = performance.now();
    let r = null, body = null;
    try {
      const data = await toBase64(file);
      r = await fetch("api/caption", {method: "POST", headers: {"content-type": "application/json"},
                                      body: JSON.stringify({name: file.name, data})});
      body = await r.json().catch(() => null);
    } catch (e) {
      return fail(my, `${file.name}: the server did not answer (${e}). Is \`pipeline serve\` still running?`);
    }
    if (my !== seq) return;                   // a newer photo was picked meanwhile
    if (!r.ok) return fail(my, messageOf(r.status, body, file.name));
    S.lastMs = performance.now() - t0;
    S.busy = false;
    $("#status").textContent = "";
    render(file, body);
  }

  function fail(my, msg) {
    if (my !== seq) return;
    S.busy = false;
    $("#status").textContent = "";
    $("#result").hidden = true;
    show(msg);
  }

  function render(file, res) {
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = URL.createObjectURL(file);
    $("#photo").src = objectUrl;
    S.result = res;
    const list = $("#beams");
    list.textContent = "";
    res.beams.forEach((b, k) => {
      const li = document.createElement("li");
      li.append(b.caption || "(empty caption)");
      const s = document.createElement("span");
      s.className = "score";
      s.textContent = b.score.toFixed(2) + (b.ended ? "" : " (cut at max length)");
      li.appendChild(s);
      li.addEventListener("click", () => showBeam(k));
      list.appendChild(li);
    });
    $("#timing").textContent = `${res.name}: captioned in ${res.seconds.toFixed(2)} s on the server, ` +
                               `${(S.lastMs / 1000).toFixed(2)} s from upload to caption; model ${res.model}.`;
    $("#result").hidden = false;
    showBeam(0);
  }

  function showBeam(k) {
    const res = S.result;
    beam = res.beams[k];
    S.shown = k;
    maps = beam.maps ? BROWSE.overlay.decodeMaps(beam.maps) : null;
    pinned = hover = null;
    const cap = $("#caption");
    cap.textContent = "";
    beam.words.forEach((w, t) => {
      const s = document.createElement("span");
      s.className = "w";
      s.textContent = w;
      s.tabIndex = 0;
      s.dataset.t = t;
      s.addEventListener("mouseenter", () => { hover = t; update(); });
      s.addEventListener("mouseleave", () => { hover = null; update(); });
      s.addEventListener("click", () => { pinned = pinned === t ? null : t; update(); });
      s.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); s.click(); } });
      cap.append(s, " ");
    });
    if (!beam.words.length) cap.textContent = "(empty caption)";
    document.querySelectorAll("#beams li").forEach((li, j) => li.classList.toggle("shown", j === k));
    const [gh, gw] = res.grid, canvas = $("#att");
    canvas.width = gw * UP;
    canvas.height = gh * UP;
    update();
  }

  function update() {
    const t = hover ?? pinned, canvas = $("#att");
    document.querySelectorAll("#caption .w").forEach((s, k) => {
      s.classList.toggle("active", k === t);
      s.classList.toggle("pinned", k === pinned);
    });
    if (t === null || !maps) {
      canvas.classList.remove("on");
      $("#wordinfo").textContent = "Hover or click a word to see where the model looked when it said it.";
      return;
    }
    BROWSE.overlay.drawMap(canvas, maps, t, S.result.grid, UP);
    canvas.classList.add("on");
    $("#wordinfo").textContent = `“${beam.words[t]}”, word ${t + 1} of ${beam.words.length}`;
  }

  const drop = $("#drop");
  $("#file").addEventListener("change", (e) => { pick(Array.from(e.target.files)); e.target.value = ""; });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("#file").click(); } });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files); });
  // a file dropped beside the box must not make the browser navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  if (!window.BROWSE || !BROWSE.overlay) show("browse/app.js did not load: the attention overlay is unavailable.");
  loadInfo();
})();
