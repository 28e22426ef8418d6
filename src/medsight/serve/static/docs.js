"use strict";
// A minimal, local API reference built from /openapi.json (no CDN, no third-party code).
(function () {
  const main = document.getElementById("api");
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };
  const ref = (spec, schema) => {
    while (schema && schema.$ref) schema = spec.components.schemas[schema.$ref.split("/").pop()];
    return schema || {};
  };
  function fields(spec, schema) {
    schema = ref(spec, schema);
    const dl = el("dl", undefined, "fields");
    for (const [name, prop] of Object.entries(schema.properties || {})) {
      const p = ref(spec, prop);
      const type = p.type || (p.anyOf || []).map((a) => ref(spec, a).type || "object").join(" | ") || "object";
      dl.append(el("dt", name + ((schema.required || []).includes(name) ? " (required)" : "") + ": " + type));
      dl.append(el("dd", prop.description || p.description || p.title || ""));
    }
    return dl;
  }
  fetch("/openapi.json").then((r) => r.json()).then((spec) => {
    main.textContent = "";
    main.append(el("h2", spec.info.title + " " + spec.info.version), el("p", spec.info.description || ""));
    const schemes = (spec.components || {}).securitySchemes || {};
    const auth = el("section", undefined, "card");
    auth.append(el("h3", "Authentication"));
    if (Object.keys(schemes).length === 0) auth.append(el("p", "This server needs no API key."));
    for (const [name, s] of Object.entries(schemes)) {
      auth.append(el("p", name + ": " + (s.type === "apiKey" ? "header " + s.name : s.type + " " + (s.scheme || "")) +
        (s.description ? " (" + s.description + ")" : "")));
    }
    main.append(auth);
    for (const [path, ops] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(ops)) {
        const sec = el("section", undefined, "card");
        sec.append(el("h3", method.toUpperCase() + " " + path));
        if (op.summary) sec.append(el("p", op.summary));
        if (op.description) sec.append(el("p", op.description));
        for (const prm of op.parameters || []) {
          sec.append(el("p", "query " + prm.name + ": " + ((prm.schema || {}).type || "") + " " + (prm.description || "")));
        }
        const body = ((op.requestBody || {}).content || {})["multipart/form-data"];
        if (body) {
          sec.append(el("h4", "multipart/form-data fields"));
          sec.append(fields(spec, body.schema));
        }
        const resp = el("h4", "Responses");
        sec.append(resp);
        const ul = el("ul");
        for (const [code, r] of Object.entries(op.responses || {})) ul.append(el("li", code + ": " + (r.description || "")));
        sec.append(ul);
        const ok = ((((op.responses || {})["200"] || {}).content || {})["application/json"] || {}).schema;
        if (ok && ref(spec, ok).properties) {
          sec.append(el("h4", "200 body"));
          sec.append(fields(spec, ok));
        }
        main.append(sec);
      }
    }
  }).catch((e) => { main.textContent = "cannot load /openapi.json: " + e; });
})();
