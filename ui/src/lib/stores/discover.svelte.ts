// Discover: Hub search state and installs in progress (per repository).
import { api, newTaskId, toApiError, type AdapterHit, type ApiError, type ProgressEvent, type Sort } from '../api';
import { errors } from './errors.svelte';

export interface InstallState {
  taskId: string;
  progress: ProgressEvent | null;
  error: ApiError | null;
  running: boolean;
}

// Exactly the shell's orders (generated Sort): a Hub order it does not know would be refused.
export const SORTS: { value: Sort; label: string }[] = [
  { value: 'downloads', label: 'Most downloads' },
  { value: 'likes', label: 'Most likes' },
  { value: 'recent', label: 'Recently updated' },
];

export class DiscoverStore {
  query = $state('');
  sort = $state<Sort>('downloads');
  limit = $state(30);
  results = $state<AdapterHit[]>([]);
  searching = $state(false);
  searched = $state(false);
  error = $state<ApiError | null>(null);
  installs = $state<Record<string, InstallState>>({});
  #seq = 0;

  async search(): Promise<void> {
    const seq = ++this.#seq;
    this.searching = true;
    this.error = null;
    try {
      const q = this.query.trim();
      const res = await api.hubSearch({ query: q ? q : null, sort: this.sort, limit: this.limit });
      if (seq !== this.#seq) return; // a newer search answered
      this.results = res;
      this.searched = true;
    } catch (e) {
      if (seq === this.#seq) this.error = toApiError(e);
    } finally {
      if (seq === this.#seq) this.searching = false;
    }
  }

  /** Install a result; resolves with the new adapter id (null on failure / cancel). */
  async install(hit: AdapterHit, onInstalled?: () => void): Promise<string | null> {
    if (!hit.compatible || hit.installed_as || this.installs[hit.repo]?.running) return null;
    const taskId = newTaskId('install');
    this.installs[hit.repo] = { taskId, progress: null, error: null, running: true };
    try {
      const a = await api.adapterInstall({ repo: hit.repo, revision: null, subfolder: hit.subfolder }, taskId, (p) => {
        const s = this.installs[hit.repo];
        if (s && s.taskId === taskId) s.progress = p;
      });
      this.results = this.results.map((r) => (r.repo === hit.repo ? { ...r, installed_as: a.id } : r));
      delete this.installs[hit.repo];
      onInstalled?.();
      return a.id;
    } catch (e) {
      const err = toApiError(e);
      const s = this.installs[hit.repo];
      if (s && s.taskId === taskId) {
        s.running = false;
        s.progress = null;
        s.error = err.code === 'cancelled' ? null : err;
        if (err.code === 'cancelled') delete this.installs[hit.repo];
      }
      return null;
    }
  }

  async cancel(repo: string): Promise<void> {
    const s = this.installs[repo];
    if (!s?.running) return;
    try {
      await api.taskCancel(s.taskId);
    } catch (e) {
      errors.push(`Cancel install of ${repo}`, e);
    }
  }

  dismissInstallError(repo: string): void {
    delete this.installs[repo];
  }
}
