// First run: one model choice (base or embedder): a local path, or a Hub download.
import { api, newTaskId, toApiError, type ApiError, type ProgressEvent } from '../api';
import { errors } from './errors.svelte';

export class ModelChoice {
  mode = $state<'local' | 'hub'>('local');
  path = $state('');
  repo = $state('');
  revision = $state('');
  file = $state('');
  pulling = $state(false);
  taskId = $state<string | null>(null);
  progress = $state<ProgressEvent | null>(null);
  error = $state<ApiError | null>(null);
  /** Where the download landed (then used as the path). */
  pulled = $state<string | null>(null);

  constructor(path: string | null) {
    this.path = path ?? '';
  }

  /** The path setup_models gets, or '' when none is chosen yet. */
  get chosenPath(): string {
    return this.mode === 'local' ? this.path.trim() : (this.pulled ?? '');
  }

  async pull(): Promise<string | null> {
    const repo = this.repo.trim();
    if (!repo || this.pulling) return null;
    const taskId = newTaskId('pull');
    this.taskId = taskId;
    this.pulling = true;
    this.error = null;
    this.pulled = null;
    this.progress = null;
    try {
      const r = await api.modelPull(
        { repo, revision: this.revision.trim() || null, file: this.file.trim() || null },
        taskId,
        (p) => (this.progress = p),
      );
      this.pulled = r.path;
      return r.path;
    } catch (e) {
      const err = toApiError(e);
      if (err.code !== 'cancelled') this.error = err;
      return null;
    } finally {
      this.pulling = false;
      this.taskId = null;
    }
  }

  async cancel(): Promise<void> {
    if (!this.taskId) return;
    try {
      await api.taskCancel(this.taskId);
    } catch (e) {
      errors.push('Cancel download', e);
    }
  }
}
