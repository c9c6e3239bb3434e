/** Feeds the page stream into a Writable, respecting backpressure. */
import { once } from 'node:events';
import { finished } from 'node:stream/promises';

/**
 * Writes header then page for every stream page, waits for 'drain' whenever
 * write() returns false, then ends the stream and waits for 'finish'.
 * `onDrain` runs at each wait (RSS sampling hooks in there).
 */
export async function pumpPages(out, workload, onDrain) {
  const { pages, headers, pageCount } = workload;
  for (let i = 0; i < pageCount; i++) {
    const k = workload.poolIndex(i);
    out.write(headers[k]);
    if (!out.write(pages[k])) {
      if (onDrain !== undefined) onDrain();
      await once(out, 'drain');
    }
  }
  out.end();
  await finished(out);
}
