"""Foreign file formats (building block): readers and writers of other projects' folders, in our key layouts."""
