#!/usr/bin/env node
// The `snapstream` command; the implementation is built into dist/ by `npm run build`.
import { main } from '../dist/cli/main.js';

process.exitCode = await main(process.argv.slice(2));
