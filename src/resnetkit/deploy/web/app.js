// The web page: send the chosen image to /v1/predict and /v1/explain, draw the top-5 bars and the overlay; for a
// multi-label model also list every label at or above its threshold (and mark those bars).
"use strict";

const $ = (id) => document.getElementById(id);

async function getJSON(response) {
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function showModel() {
  try {
    const info = await getJSON(await fetch("/v1/model"));
    const kind = info.multilabel ? "multi-label · " : "";
    $("model-info").textContent =
      `${info.name} · ${kind}${info.num_classes} classes · ${info.input_size} px input · ${info.backend} backend · v${info.version}`;
  } catch (err) {
    $("model-info").textContent = `model information unavailable: ${err.message}`;
  }
}

function drawBars(topK, labels) {
  const list = $("bars");
  list.replaceChildren();
  const above = new Set((labels || []).map((l) => l.index));
  for (const { class: name, index, prob } of topK) {
    const item = document.createElement("li");
    item.className = above.has(index) ? "bar above" : "bar";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(100 * prob).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * prob).toFixed(1)}%`;
    item.append(label, track, value);
    list.append(item);
  }
}

async function classify(file) {
  if (!file) return;
  $("status").textContent = `classifying ${file.name}…`;
  $("status").className = "";
  $("result").hidden = false;
  $("preview").src = URL.createObjectURL(file);
  $("overlay").removeAttribute("src");
  $("bars").replaceChildren();
  $("labels").hidden = true;
  try {
    const predictForm = new FormData();
    predictForm.append("files", file, file.name);
    const prediction = await getJSON(await fetch("/v1/predict?top_k=5", { method: "POST", body: predictForm }));
    const { top_k: topK, labels } = prediction.predictions[0];
    drawBars(topK, labels);
    let answer = topK[0].class;
    $("bars-box").classList.toggle("multilabel", Boolean(labels));
    if (labels) {
      answer = labels.map((l) => l.class).join(", ") || "no label above its threshold";
      $("labels").textContent = labels.length
        ? `Labels: ${labels.map((l) => `${l.class} ${(100 * l.prob).toFixed(1)}%`).join(", ")}`
        : "Labels: none above its threshold";
      $("labels").hidden = false;
    }
    $("status").textContent = `${file.name}: ${answer} (${prediction.latency_ms} ms)`;
    const explainForm = new FormData();
    explainForm.append("file", file, file.name);
    const cam = await getJSON(await fetch("/v1/explain", { method: "POST", body: explainForm }));
    $("overlay").src = `data:image/png;base64,${cam.overlay_png_base64}`;
    $("overlay-caption").textContent = `Grad-CAM of “${cam.class}” (${(100 * cam.prob).toFixed(1)}%)`;
  } catch (err) {
    $("status").textContent = `error: ${err.message}`;
    $("status").className = "error";
  }
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => classify(event.target.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    classify(event.dataTransfer.files[0]);
  });
  showModel();
}

setUp();
