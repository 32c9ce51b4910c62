// App-wide state: status line (base model, engine, adapter count) and settings. The engine's
// state arrives by event (app_watch): the shell sends the status each time it changes.
import { api, type AppSettings, type AppStatus, type SetupRequest } from '../api';
import { errors } from './errors.svelte';

export type Screen = 'chat' | 'discover' | 'library' | 'settings';

export class AppStore {
  status = $state<AppStatus | null>(null);
  settings = $state<AppSettings | null>(null);
  screen = $state<Screen>('chat');
  /** The first status could not be read. */
  failed = $state(false);
  /** The subscription (one per store: a second would hear every change twice). */
  #watch: Promise<AppStatus | null> | null = null;
  /** Counts the statuses the watch sent: a one-off read during which it spoke is the older one. */
  #heard = 0;
  #settingsLoad: Promise<void> | null = null;

  /** Subscribes to the engine's state once; resolves with the status (null when unreadable). */
  watch(): Promise<AppStatus | null> {
    this.#watch ??= this.#subscribe();
    return this.#watch;
  }

  async #subscribe(): Promise<AppStatus | null> {
    const heard = this.#heard;
    try {
      const s = await api.appWatch((next) => {
        this.#heard += 1;
        void this.#apply(next);
      });
      // The channel may speak before the command answers; its status is then the newer one.
      if (this.#heard === heard) await this.#apply(s);
      return this.status;
    } catch (e) {
      // Not subscribed: the next refresh() tries again.
      this.#watch = null;
      this.failed = this.status === null;
      errors.push('Read app status', e);
      return null;
    }
  }

  /** Reads the status now (subscribing first if not yet). */
  async refresh(): Promise<AppStatus | null> {
    if (!this.#watch) return this.watch();
    try {
      return await this.#read(api.appStatus());
    } catch (e) {
      this.failed = this.status === null;
      errors.push('Read app status', e);
      return null;
    }
  }

  /** Records the models and starts loading the base; the watch reports when it is loaded. */
  setup(request: SetupRequest): Promise<AppStatus> {
    return this.#read(api.setupModels(request));
  }

  /** A one-off read, dropped when the watch spoke while it was in flight (that is newer). */
  async #read(pending: Promise<AppStatus>): Promise<AppStatus> {
    const heard = this.#heard;
    const s = await pending;
    if (this.#heard === heard) await this.#apply(s);
    return this.status ?? s;
  }

  async #apply(s: AppStatus): Promise<void> {
    this.status = s;
    this.failed = false;
    // Settings live in the data folder: there are none to read before the first-run setup.
    if (s.ready && !this.settings) {
      this.#settingsLoad ??= this.loadSettings().finally(() => (this.#settingsLoad = null));
      await this.#settingsLoad;
    }
  }

  async loadSettings(): Promise<void> {
    try {
      this.settings = await api.settingsGet();
    } catch (e) {
      errors.push('Read settings', e);
    }
  }

  /** After an install/remove: the adapter count in the status line. */
  async adaptersChanged(): Promise<void> {
    if (!this.status) return;
    try {
      const s = await api.appStatus();
      // Only the count: the engine's state is the watch's to report.
      if (this.status) this.status = { ...this.status, adapters: s.adapters };
    } catch (e) {
      errors.push('Read app status', e);
    }
  }
}

export const app = new AppStore();
