// Validate AsyncAPI documents with the official parser (@asyncapi/parser, pinned in package.json).
//
//   node tools/asyncapi/validate.mjs [FILE ...]      (default: docs/asyncapi.yaml)
//
// Prints every diagnostic of severity error, one a line ("FILE: error at PATH: MESSAGE [CODE]"),
// and exits 1 if there is any, or if the parser refuses the document; 0 when every file parses
// clean (warnings and hints are printed with --all but never fail). Exit 2: a file cannot be read.
// scripts/ensure-asyncapi.sh installs the parser (npm ci); tests/test_asyncapi_spec.py runs this.
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const all = args.includes('--all');
const files = args.filter((a) => a !== '--all');
if (files.length === 0) files.push(path.resolve(here, '..', '..', 'docs', 'asyncapi.yaml'));

const names = { [DiagnosticSeverity.Error]: 'error', [DiagnosticSeverity.Warning]: 'warning',
                [DiagnosticSeverity.Information]: 'info', [DiagnosticSeverity.Hint]: 'hint' };
const parser = new Parser();
let failed = false;
for (const file of files) {
  let text;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    console.error(`${file}: cannot read: ${err.message}`);
    process.exit(2);
  }
  const { document, diagnostics } = await parser.parse(text, { source: path.resolve(file) });
  const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
  for (const d of all ? diagnostics : errors) {
    const where = d.path.length ? d.path.join('/') : '(document)';
    console.log(`${file}: ${names[d.severity] ?? d.severity} at ${where}: ${d.message} [${d.code}]`);
  }
  if (document === undefined || errors.length > 0) {
    failed = true;
    console.log(`${file}: NOT PARSED, ${errors.length} error(s)`);
  } else {
    console.log(`${file}: valid AsyncAPI ${document.version()}`);
  }
}
process.exit(failed ? 1 : 0);
