// The page's only script: reads the form, asks POST /api/poems, shows the poems or the error.
"use strict";

const $ = (id) => document.getElementById(id);
let readsTitles = false;

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function request() {
  const body = {};
  for (const name of ["begin", "acrostic", "couplet"]) {
    const value = $(name).value.trim();
    if (value) body[name] = value;
  }
  const title = $("title").value.trim();
  if (readsTitles && title) body[/\s/.test(title) ? "keywords" : "title"] = title;
  if ($("form").value !== "free") body.form = $("form").value;
  body.rhyme = $("rhyme").checked;
  body.tones = $("tones").checked;
  body.num = Number($("num").value);
  body.temperature = Number($("temperature").value);
  body.script = document.querySelector("input[name=script]:checked").value;
  return body;
}

function render(poems) {
  const section = $("poems");
  section.replaceChildren();
  section.classList.toggle("vertical", $("vertical").checked);
  for (const poem of poems) {
    const article = document.createElement("article");
    article.className = "poem";
    article.lang = "zh";
    for (const line of poem.lines) {
      const p = document.createElement("p");
      p.textContent = line;           // text, never markup
      article.append(p);
    }
    section.append(article);
  }
}

async function write(event) {
  event.preventDefault();
  showError("");
  $("write").disabled = true;
  $("status").textContent = "writing…";
  const started = performance.now();
  try {
    const response = await fetch("/api/poems", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(request()),
    });
    const answer = await response.json().catch(() => ({error: `the server answered ${response.status}`}));
    if (!response.ok) {
      showError(answer.error || `the server answered ${response.status}`);
      $("status").textContent = "";
      return;
    }
    render(answer.poems);
    const seconds = (performance.now() - started) / 1000;
    $("status").textContent = `${answer.poems.length} poem${answer.poems.length === 1 ? "" : "s"} in ` +
      `${seconds.toFixed(2)} s (sampler batch of ${answer.batch.requests} request${answer.batch.requests === 1 ? "" : "s"})`;
  } catch (error) {
    showError("the server cannot be reached; is `python -m tangshi_jax.serve` still running?");
    $("status").textContent = "";
  } finally {
    $("write").disabled = false;
  }
}

async function describeModel() {
  try {
    const response = await fetch("/api/model");
    if (response.status === 503) {  // starting: the server compiles its programs first
      $("model").textContent = "warming up: the server is compiling its programs…";
      $("write").disabled = true;
      setTimeout(describeModel, 2000);
      return;
    }
    const model = await response.json();
    $("write").disabled = false;
    readsTitles = model.reads_titles;
    $("title-row").hidden = !readsTitles;
    $("num").max = model.limits.num;
    const m = model.model;
    const loss = model.val_char_ppl ? `, validation perplexity ${model.val_char_ppl.toFixed(0)} a character` : "";
    $("model").textContent = `${m.layers}×${m.hidden} ${m.cell.toUpperCase()}, ${model.vocab_size.toLocaleString()} ` +
      `characters, step ${model.step}${loss}`;
  } catch (error) {
    $("model").textContent = "";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", write);
  $("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
  $("vertical").addEventListener("change", () => $("poems").classList.toggle("vertical", $("vertical").checked));
  describeModel();
});
