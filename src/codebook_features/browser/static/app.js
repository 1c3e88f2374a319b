// Code browser: plain JS over the JSON API of codebook_features.browser.app.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, steer: [] };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") e.addEventListener("click", v);
    else if (k === "className") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

function showError(message) {
  const box = $("error");
  if (message) { box.textContent = message; box.hidden = false; }
  else { box.textContent = ""; box.hidden = true; }
}

// Every call: JSON in, JSON out; an answer with "error" is shown and rejects.
async function api(path, params = {}, body = null) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);
  let data;
  try {
    const r = await fetch(url, body === null ? {} : {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    data = await r.json();
  } catch (e) {
    data = { error: `the server did not answer (${e.message})` };
  }
  if (data.error) { showError(data.error); throw new Error(data.error); }
  showError("");
  return data;
}

const pct = (x) => (x === null || x === undefined ? "—" : (100 * x).toFixed(1) + "%");
const spec = (site, group, code) => `${site}:${group}:${code}`;

function codeLink(site, group, code, label) {
  return el("span", { className: "code-link", onclick: () => openCode(site, group, code) },
            label ?? `${group}:${code}`);
}

// ------------------------------------------------------------------ search
async function search(ev) {
  ev.preventDefault();
  const mode = $("search-mode").value, site = $("site").value, q = $("query").value;
  const params = { site, n: 50, neurons: $("neurons").checked ? 1 : 0 };
  params[mode] = q;
  const tbody = $("results").querySelector("tbody");
  $("search-summary").textContent = "searching…";
  let data;
  try { data = await api(`/api/${mode}`, params); }
  catch (e) { $("search-summary").textContent = ""; return; }
  tbody.replaceChildren();
  for (const m of data.matches) {
    const tr = el("tr", { onclick: () => openCode(site, m.group, m.code) },
      el("td", {}, m.group), el("td", {}, m.code), el("td", {}, pct(m.precision)),
      el("td", {}, pct(m.recall)), el("td", {}, m.fired), el("td", {}, m.hits),
      el("td", {}, pct(m.neuron_precision)));
    tbody.append(tr);
  }
  const pos = data.positives !== undefined ? ` on ${data.positives} matching tokens` : "";
  $("search-summary").textContent = data.matches.length
    ? `${data.matches.length} codes${pos}; click one to open it` : `no codes${pos}`;
}

// -------------------------------------------------------------------- code
function renderTokens(container, tokens, hitPos, doc) {
  for (const t of tokens) {
    const span = el("span", { className: "tok" + (t.pos === hitPos ? " hit" : ""),
                              "data-doc": doc, "data-pos": t.pos,
                              title: `doc ${doc}, position ${t.pos}` }, t.text);
    span.addEventListener("click", () => openCodesAt(doc, t.pos));
    container.append(span);
  }
}

async function openCode(site, group, code) {
  let data;
  try { data = await api("/api/code", { site, group, code }); } catch (e) { return; }
  state.code = { site, group, code };
  $("code-panel").hidden = false;
  $("code-title").textContent = `${site} — group ${group}, code ${code}`;
  const s = data.stats;
  $("code-freq").textContent =
    `fires on ${s.count} tokens (${(100 * s.frequency).toFixed(3)}% of the index)`;
  const counts = (id, rows) => $(id).replaceChildren(
    ...rows.map(([tok, n]) => el("li", {}, `${JSON.stringify(tok)} × ${n}`)));
  counts("code-tokens", s.tokens);
  counts("code-next", s.next_tokens);
  // The model's own next-token predictions where the code fires (absent in old indexes).
  const hasPred = Array.isArray(s.predicted_next_tokens);
  $("code-pred-box").hidden = !hasPred;
  counts("code-pred", hasPred ? s.predicted_next_tokens : []);
  const box = $("contexts");
  box.replaceChildren();
  if (!data.contexts.length) box.append(el("p", { className: "muted" }, "never fires"));
  for (const c of data.contexts) {
    const line = el("div", { className: "ctx" });
    renderTokens(line, c.tokens, c.position, c.doc);
    line.append(el("span", { className: "score" }, `doc ${c.doc} · ${c.score.toFixed(3)}`));
    box.append(line);
  }
  const sim = $("code-similar");
  sim.replaceChildren();
  if (!state.info.model) {
    sim.append(el("li", { className: "muted" }, "needs the model"));
  } else {
    try {
      const r = await fetch(`/api/similar?site=${encodeURIComponent(site)}&group=${group}` +
                            `&code=${code}`).then((x) => x.json());
      if (r.error) sim.append(el("li", { className: "muted" }, r.error));
      for (const x of r.similar || []) {
        sim.append(el("li", {}, codeLink(site, group, x.code, `${x.code}`),
                      `cos ${x.similarity.toFixed(3)}`));
      }
    } catch (e) { sim.append(el("li", { className: "muted" }, e.message)); }
  }
  $("code-panel").scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------- codes at token
async function openCodesAt(doc, pos) {
  let data;
  try { data = await api("/api/codes_at", { doc, pos }); } catch (e) { return; }
  $("codes-at-panel").hidden = false;
  const ctx = $("codes-at-context");
  ctx.replaceChildren();
  renderTokens(ctx, data.tokens, pos, doc);
  ctx.querySelectorAll(".tok.hit").forEach((t) => t.classList.replace("hit", "here"));
  const tbody = $("codes-at").querySelector("tbody");
  tbody.replaceChildren();
  for (const s of data.sites) {
    s.groups.forEach((codes, g) => {
      const cell = el("td", {});
      for (const c of codes) cell.append(codeLink(s.name, g, c, `${c}`));
      tbody.append(el("tr", {}, el("td", {}, s.name), el("td", {}, g), cell));
    });
  }
  $("codes-at-panel").scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------- steering
function renderSteerCodes() {
  const box = $("steer-codes");
  box.replaceChildren();
  if (!state.steer.length) {
    box.append(el("span", { className: "muted" }, "no codes yet: open a code and press " +
                                                   "“add to steering”, or type one"));
  }
  state.steer.forEach((s, i) => {
    const rm = el("button", { type: "button", title: "remove" }, "×");
    rm.addEventListener("click", () => { state.steer.splice(i, 1); renderSteerCodes(); });
    box.append(el("span", { className: "chip" }, s, rm));
  });
}

function addSteer(s) {
  s = s.trim();
  if (s && !state.steer.includes(s)) state.steer.push(s);
  renderSteerCodes();
}

async function steer(ev) {
  ev.preventDefault();
  const body = {
    prompt: $("steer-prompt").value, codes: state.steer, mode: $("steer-mode").value,
    max_new_tokens: Number($("steer-tokens").value), num_samples: Number($("steer-samples").value),
    seed: Number($("steer-seed").value),
  };
  $("steer-status").textContent = "generating…";
  let data;
  try { data = await api("/api/steer", {}, body); }
  catch (e) { $("steer-status").textContent = ""; return; }
  $("steer-status").textContent = `steered with ${data.codes.join(", ")}`;
  const fill = (id, rows) => $(id).replaceChildren(
    ...rows.map((t) => el("li", {}, el("b", {}, data.prompt), t)));
  fill("steer-out-unsteered", data.unsteered);
  fill("steer-out-steered", data.steered);
  $("steer-out").hidden = false;
}

// -------------------------------------------------------------------- start
async function start() {
  $("search-form").addEventListener("submit", search);
  $("steer-form").addEventListener("submit", steer);
  $("add-steer").addEventListener("click", () => {
    if (state.code) addSteer(spec(state.code.site, state.code.group, state.code.code));
  });
  $("steer-add-btn").addEventListener("click", () => { addSteer($("steer-add").value);
                                                       $("steer-add").value = ""; });
  renderSteerCodes();
  let info;
  try { info = await api("/api/info"); } catch (e) { $("info").textContent = "no index"; return; }
  state.info = info;
  $("info").textContent = `${info.index}: ${info.num_tokens.toLocaleString()} tokens, ` +
    `${info.num_docs.toLocaleString()} documents, ${info.sites.length} sites` +
    (info.model ? ", model loaded" : "");
  $("site").replaceChildren(...info.sites.map((s) => el("option", { value: s.name },
    `${s.name} (${s.groups}×${s.num_codes}, k=${s.k})`)));
  $("neurons").disabled = !info.model;
  $("steer-status").textContent = info.model ? "" : info.model_error;
  $("steer-btn").disabled = !info.model;
  document.body.dataset.ready = "1";
}

start();
