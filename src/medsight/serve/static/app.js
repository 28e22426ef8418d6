"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  let authRequired = false;

  function headers() {
    const h = {};
    const key = $("api-key").value.trim();
    if (key) h["X-API-Key"] = key;
    return h;
  }

  function setStatus(text, isError) {
    $("status").textContent = text;
    $("status").className = isError ? "error" : "";
  }

  let clinicalColumns = [];

  async function loadModel() {
    try {
      const health = await (await fetch("/healthz")).json();
      authRequired = !!health.auth_required;
      $("key-row").hidden = !authRequired;
      if (authRequired && !$("api-key").value) {
        $("model-info").textContent = "this server needs an API key";
        return;
      }
      const r = await fetch("/v1/model", { headers: headers() });
      if (!r.ok) {
        $("model-info").textContent = "model info: " + r.status + " " + ((await r.json()).detail || "");
        return;
      }
      const m = await r.json();
      clinicalColumns = m.clinical_columns || [];
      const box = $("clinical");
      box.textContent = "";
      for (const c of clinicalColumns) {
        const label = document.createElement("label");
        label.textContent = c + " ";
        const input = document.createElement("input");
        input.dataset.column = c;
        input.placeholder = "value";
        label.appendChild(input);
        box.appendChild(label);
      }
      box.hidden = clinicalColumns.length === 0;
      $("model-info").textContent = m.name + " · " + m.task + " · classes: " + m.classes.join(", ") +
        " · threshold " + (m.threshold === null ? "default" : JSON.stringify(m.threshold)) +
        " · " + m.model_version;
    } catch (e) {
      $("model-info").textContent = "cannot reach the server";
    }
  }

  function showResult(res) {
    $("pred-class").textContent = Array.isArray(res.predicted) ? (res.predicted.join(", ") || "none") : res.predicted;
    const ood = $("ood-warning");
    ood.hidden = res.ood_flag !== true;
    ood.textContent = res.ood_flag ? "Warning: this scan does not look like the training data (OOD score " +
      res.ood_score.toFixed(1) + "); the prediction is unreliable." : "";
    $("pred-meta").textContent = "threshold " + JSON.stringify(res.threshold) +
      (res.calibrated ? " · calibrated (T=" + res.temperature.toFixed(3) + ")" : " · uncalibrated") +
      " · " + res.model_version;
    const probs = $("probs");
    probs.textContent = "";
    for (const [name, p] of Object.entries(res.probabilities)) {
      const row = document.createElement("div");
      row.className = "prob-row";
      row.dataset.class = name;
      row.dataset.prob = String(p);
      const label = document.createElement("span");
      label.className = "prob-label";
      label.textContent = name;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = (100 * p).toFixed(1) + "%";
      bar.appendChild(fill);
      const text = document.createElement("span");
      text.className = "prob-text";
      text.textContent = p.toFixed(4);
      row.append(label, bar, text);
      probs.appendChild(row);
    }
    if (res.image_png) $("image").src = "data:image/png;base64," + res.image_png;
    if (res.colormap_png) $("heatmap").src = "data:image/png;base64," + res.colormap_png;
    $("heatmap").hidden = !res.colormap_png;
    $("result").hidden = false;
  }

  async function predict(file) {
    if (!file) return;
    setStatus("predicting " + file.name + " …", false);
    $("result").dataset.state = "busy";
    const form = new FormData();
    form.append("file", file, file.name);
    if (clinicalColumns.length) {
      const values = {};
      for (const input of document.querySelectorAll("#clinical input")) values[input.dataset.column] = input.value;
      form.append("clinical", JSON.stringify(values));
    }
    try {
      const r = await fetch("/v1/predict?explain=true", { method: "POST", body: form, headers: headers() });
      const body = await r.json().catch(() => ({ detail: "unreadable response" }));
      if (!r.ok) {
        if (r.status === 401) $("key-row").hidden = false;
        setStatus("error " + r.status + ": " + body.detail, true);
        $("result").hidden = true;
        $("result").dataset.state = "error";
        return;
      }
      showResult(body);
      setStatus(file.name + ": done", false);
      $("result").dataset.state = "done";
      $("result").dataset.file = file.name;
    } catch (e) {
      setStatus("request failed: " + e, true);
      $("result").dataset.state = "error";
    }
  }

  $("file").addEventListener("change", (e) => { predict(e.target.files[0]); e.target.value = ""; });
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => predict(e.dataTransfer.files[0]));
  $("opacity").addEventListener("input", (e) => {
    $("heatmap").style.opacity = e.target.value / 100;
    $("opacity-value").textContent = e.target.value + "%";
  });
  $("api-key").addEventListener("change", loadModel);
  $("heatmap").style.opacity = 0.45;
  loadModel();
})();
