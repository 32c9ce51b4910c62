// App-wide state: status line (base model, engine, adapter count) and settings.
import { api, type AppSettings, type AppStatus } from '../api';
import { errors } from './errors.svelte';

export type Screen = 'chat' | 'discover' | 'library' | 'settings';

export class AppStore {
  status = $state<AppStatus | null>(null);
  settings = $state<AppSettings | null>(null);
  screen = $state<Screen>('chat');
  /** The first status could not be read. */
  failed = $state(false);
  #poll: ReturnType<typeof setTimeout> | null = null;

  async refresh(): Promise<AppStatus | null> {
    try {
      this.status = await api.appStatus();
      this.failed = false;
      // Settings live in the data folder: there are none to read before the first-run setup.
      if (this.status.ready && !this.settings) await this.loadSettings();
      if (this.status.engine === 'loading') this.#schedule();
      return this.status;
    } catch (e) {
      this.failed = this.status === null;
      errors.push('Read app status', e);
      return null;
    }
  }

  /** Polls app_status while the engine is loading. */
  #schedule(ms = 700): void {
    if (this.#poll) return;
    this.#poll = setTimeout(() => {
      this.#poll = null;
      void this.refresh();
    }, ms);
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
      this.status = await api.appStatus();
    } catch (e) {
      errors.push('Read app status', e);
    }
  }
}

export const app = new AppStore();
