/**
 * A minimal GDB remote-protocol client for QEMU's gdbstub on a unix socket
 * (`-chardev socket,id=gdb0,path=P,server=on,wait=off -gdb chardev:gdb0`),
 * enough to write guest-physical memory: `Qqemu.PhyMemMode:1`, then `M`
 * packets. Facts (QEMU 7.2 gdbstub.c): connecting stops the VM, and so does
 * any byte received while it runs; packets are at most 4096 bytes, so
 * writes go in 1 KiB chunks. Independent of src/: the test's own tool.
 */
import { connect, type Socket } from 'node:net';

const CHUNK_BYTES = 1024;
const REPLY_TIMEOUT_MS = 30_000;

export class GdbClient {
  private readonly _socket: Socket;
  private _buffer = '';
  private _waiter: ((reply: string) => void) | undefined;

  private constructor(socket: Socket) {
    this._socket = socket;
    socket.on('data', (chunk: Buffer) => {
      this._buffer += chunk.toString('latin1');
      this._drain();
    });
  }

  static async connect(path: string): Promise<GdbClient> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const client = new GdbClient(socket);
        const reply = await client.command('Qqemu.PhyMemMode:1');
        if (reply !== 'OK') throw new Error(`gdbstub refused PhyMemMode: '${reply}'`);
        return client;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  /** Writes `data` at guest-physical `address` (the VM is stopped by the stub if it ran). */
  async writePhys(address: number, data: Buffer): Promise<void> {
    for (let at = 0; at < data.length; at += CHUNK_BYTES) {
      const part = data.subarray(at, at + CHUNK_BYTES);
      const reply = await this.command(`M${(address + at).toString(16)},${part.length.toString(16)}:${part.toString('hex')}`);
      if (reply !== 'OK') throw new Error(`gdbstub M at 0x${(address + at).toString(16)}: '${reply}'`);
    }
  }

  /** Reads guest-physical memory. */
  async readPhys(address: number, length: number): Promise<Buffer> {
    const parts: Buffer[] = [];
    for (let at = 0; at < length; at += CHUNK_BYTES) {
      const n = Math.min(CHUNK_BYTES, length - at);
      const reply = await this.command(`m${(address + at).toString(16)},${n.toString(16)}`);
      if (!/^[0-9a-f]+$/.test(reply)) throw new Error(`gdbstub m: '${reply}'`);
      parts.push(Buffer.from(reply, 'hex'));
    }
    return Buffer.concat(parts);
  }

  close(): void {
    this._socket.destroy();
  }

  private command(body: string): Promise<string> {
    let sum = 0;
    for (const c of Buffer.from(body, 'latin1')) sum = (sum + c) & 0xff;
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`gdbstub: no reply to ${body.slice(0, 20)}`)), REPLY_TIMEOUT_MS);
      this._waiter = (reply) => {
        clearTimeout(timer);
        resolve(reply);
      };
      this._socket.write(`$${body}#${sum.toString(16).padStart(2, '0')}`);
      this._drain();
    });
  }

  /** Takes the next full packet (skipping acks and stop notifications), acks it and hands it to the waiter. */
  private _drain(): void {
    for (;;) {
      this._buffer = this._buffer.replace(/^[+-]+/, '');
      const start = this._buffer.indexOf('$');
      if (start < 0) return;
      const hash = this._buffer.indexOf('#', start);
      if (hash < 0 || this._buffer.length < hash + 3) return;
      const body = this._buffer.slice(start + 1, hash);
      this._buffer = this._buffer.slice(hash + 3);
      this._socket.write('+');
      // Stop replies (T02thread:...) come whenever the VM stops (any cause); they answer no M/m packet (OK, Exx or lowercase hex).
      if (/^[TS][0-9a-f]{2}/.test(body)) continue;
      const waiter = this._waiter;
      this._waiter = undefined;
      waiter?.(body);
    }
  }
}
