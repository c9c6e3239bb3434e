/** (a) Unbuffered: one fs.writeSync per chunk through the page cache, fsync at the end. */
import fs from 'node:fs';

export default {
  id: 'a',
  label: 'writeSync per chunk + fsync',
  sizeClass: 'slow',
  run(ctx) {
    const { workload } = ctx;
    const { pages, headers, pageCount } = workload;
    const fd = fs.openSync(ctx.path, 'w', 0o600);
    let bytes = 0;
    for (let i = 0; i < pageCount; i++) {
      const k = workload.poolIndex(i);
      bytes += fs.writeSync(fd, headers[k]);
      bytes += fs.writeSync(fd, pages[k]);
    }
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    return { bytes };
  },
};
