"""From images to label maps in the cases' original geometry."""
