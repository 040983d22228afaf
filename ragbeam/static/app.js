'use strict';
// The search page: every piece of corpus text is set with textContent (never innerHTML), so
// a document holding markup shows it as text.

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// The chunk's text with the query's words marked: text nodes and <mark> elements only.
function highlighted(text, query) {
  const words = Array.from(new Set(query.toLowerCase().match(/[\p{L}\p{N}]{2,}/gu) || []));
  const box = el('p', 'text');
  if (!words.length) { box.textContent = text; return box; }
  const escaped = words.map(w => w.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
  const pattern = new RegExp('(' + escaped.join('|') + ')', 'giu');
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    box.append(document.createTextNode(text.slice(last, match.index)));
    box.append(el('mark', null, match[0]));
    last = match.index + match[0].length;
  }
  box.append(document.createTextNode(text.slice(last)));
  return box;
}

function source(hit) {
  const page = hit.page ? ` p.${hit.page}` : '';
  return `${hit.uri}${page} [${hit.start}:${hit.end}]`;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function search(event) {
  if (event) event.preventDefault();
  const q = document.getElementById('q').value;
  const params = new URLSearchParams({ q, mode: document.getElementById('mode').value,
                                       k: document.getElementById('k').value });
  const list = document.getElementById('results');
  const message = document.getElementById('message');
  message.textContent = '';
  list.replaceChildren();
  try {
    const found = await getJSON('/api/search?' + params);
    if (!found.hits.length) message.textContent = 'No results.';
    for (const hit of found.hits) {
      const item = el('li', 'hit');
      item.append(el('div', 'source', source(hit)));
      item.append(highlighted(hit.text, q));
      const ranks = `score ${hit.score.toFixed(4)} · dense #${hit.dense_rank ?? '–'} · ` +
                    `lexical #${hit.lexical_rank ?? '–'}`;
      item.append(el('div', 'ranks', ranks));
      list.append(item);
    }
  } catch (error) {
    message.textContent = error.message;
  }
}

async function status() {
  const box = document.getElementById('status');
  try {
    const found = await getJSON('/api/status');
    const run = found.last_run.run || {};
    box.textContent = `version ${found.version} · ${found.chunks} chunks · ${found.objects} ` +
      `objects · last run: ${run.objects_new ?? 0} new, ${run.objects_changed ?? 0} changed, ` +
      `${run.objects_deleted ?? 0} deleted`;
    box.dataset.version = found.version;
    if (found.uploads) {
      document.getElementById('upload-panel').hidden = false;
      document.getElementById('token').hidden = !found.token_required;
    }
  } catch (error) {
    box.textContent = error.message;
  }
}

async function watch(runId, line) {
  for (;;) {
    const run = await getJSON(`/api/runs/${runId}`);
    line.textContent = `run ${run.id}: ${run.state}` + (run.message ? ` — ${run.message}` : '');
    line.dataset.state = run.state;
    if (run.state === 'committed' || run.state === 'failed') { status(); return; }
    await new Promise(resolve => setTimeout(resolve, 1000));
  }
}

async function upload(event) {
  event.preventDefault();
  const file = document.getElementById('file').files[0];
  const form = new FormData();
  form.append('file', file);
  const headers = {};
  const token = document.getElementById('token').value;
  if (token) headers.Authorization = `Bearer ${token}`;
  const replace = document.getElementById('replace').checked ? '?replace=true' : '';
  const line = el('li', 'run', `uploading ${file.name}…`);
  document.getElementById('runs').append(line);
  try {
    const stored = await getJSON('/api/documents' + replace, { method: 'POST', body: form, headers });
    line.textContent = `stored as ${stored.uri}; run ${stored.run} queued`;
    await watch(stored.run, line);
  } catch (error) {
    line.textContent = `${file.name}: ${error.message}`;
    line.dataset.state = 'refused';
  }
}

document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('search').addEventListener('submit', search);
  document.getElementById('upload').addEventListener('submit', upload);
  status();
});
