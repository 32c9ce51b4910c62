-- 2: the folder of a Hub adapter inside its repository.
ALTER TABLE adapters ADD COLUMN hub_subfolder TEXT;
