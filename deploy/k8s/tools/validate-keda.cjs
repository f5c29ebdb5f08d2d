// Validate KEDA resources against KEDA's own CRD schemas, offline.
// @kubernetes-models/keda compiles the openAPIV3Schema of KEDA's CRDs (keda-2.10.1.yaml) into
// validators; `new ScaledObject(doc).validate()` throws with every schema violation.
// Usage: node validate-keda.cjs < documents.json   (a JSON array of rendered manifests)
// Prints {"checked": [...], "errors": [...]}; exit 1 when a KEDA resource is invalid.
"use strict";
const fs = require("fs");
const keda = require("@kubernetes-models/keda/keda.sh/v1alpha1");

const documents = JSON.parse(fs.readFileSync(0, "utf8"));
const checked = [];
const errors = [];
for (const doc of documents) {
  if (!doc || !String(doc.apiVersion || "").startsWith("keda.sh/")) continue;
  const Model = doc.apiVersion === "keda.sh/v1alpha1" ? keda[doc.kind] : undefined;
  const name = `${doc.kind}/${(doc.metadata || {}).name}`;
  if (!Model) {
    errors.push({ resource: name, message: `no KEDA schema for ${doc.apiVersion} ${doc.kind}` });
    continue;
  }
  try {
    new Model(doc).validate();
    checked.push(name);
  } catch (err) {
    errors.push({ resource: name, message: String(err.message || err), details: err.errors || null });
  }
}
process.stdout.write(JSON.stringify({ checked, errors }, null, 1) + "\n");
process.exit(errors.length ? 1 : 0);
