/** (d) fs.createWriteStream with the same pattern, respecting backpressure, then fsync. */
import fs from 'node:fs';
import { once } from 'node:events';
import { finished } from 'node:stream/promises';

export default {
  id: 'd',
  label: 'fs.createWriteStream + fsync',
  sizeClass: 'slow',
  async run(ctx) {
    const { workload } = ctx;
    const { pages, headers, pageCount } = workload;
    const fd = fs.openSync(ctx.path, 'w', 0o600);
    const out = fs.createWriteStream('', { fd, autoClose: false });
    for (let i = 0; i < pageCount; i++) {
      const k = workload.poolIndex(i);
      out.write(headers[k]);
      if (!out.write(pages[k])) await once(out, 'drain');
    }
    out.end();
    await finished(out);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    return { bytes: out.bytesWritten };
  },
};
